"""docs/course-coverage.md maps every claim of the lecture notes to a notebook section, a test, or a reason.

The table must stay true as the course changes: every notebook section, test and document it names exists, every
row but the "not covered yet" ones names at least one, every "notes wrong" row says why, and the number of rows per
notes file equals the inventory at the top of the page (and the summary counts equal the rows)."""
import collections
import pathlib
import re

ROOT = pathlib.Path(__file__).parent.parent
DOC = ROOT / "docs" / "course-coverage.md"
STATUSES = ("covered", "partial", "notes wrong", "not covered yet")
MIN_CLAIMS = 83          # the five files make at least this many distinct claims; rows may only grow
REF = re.compile(r"`([^`]+)`(?:\s*§(\w+))?")


def _tables():
    """Every markdown table on the page as a list of rows (each a list of stripped cells), header and rule dropped."""
    tables, current = [], []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("|"):
            current.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif current:
            tables.append(current[2:])
            current = []
    if current:
        tables.append(current[2:])
    return tables


def _table_with_header(first_cell_pattern, numeric=False):
    """The first table whose first row starts with first_cell_pattern (numeric: whose second cells are counts)."""
    return next(t for t in _tables() if t and re.fullmatch(first_cell_pattern, t[0][0])
                and numeric == all(r[1].strip("*").isdigit() for r in t))


def _labels():
    return {row[0] for row in _table_with_header(r"notes \d") if row[0].startswith("notes")}


def _claims():
    return _table_with_header(r"N\d+\.\d+")


def test_every_row_is_well_formed():
    rows, labels = _claims(), _labels()
    assert len(labels) == 5
    ids = [r[0] for r in rows]
    assert len(ids) == len(set(ids)), [i for i, n in collections.Counter(ids).items() if n > 1]
    for row in rows:
        assert len(row) == 6, row
        rid, label, claim, status, where, comment = row
        assert re.fullmatch(r"N(\d)\.\d+", rid) and label == f"notes {rid[1]}", row
        assert label in labels and claim, row
        assert status in STATUSES, row
        refs = REF.findall(where)
        if status == "not covered yet":
            assert comment, f"{rid}: say why it is not covered"
        else:
            assert refs, f"{rid}: a {status} row must name a notebook section, a test or a document"
        if status == "notes wrong":
            assert comment.startswith("the notes are wrong here, because "), rid


def test_every_reference_exists():
    for rid, *_, where, _comment in _claims():
        for path, section in REF.findall(where):
            file, _, test = path.partition("::")
            target = ROOT / file
            assert target.is_file(), f"{rid}: {file} does not exist"
            text = target.read_text(encoding="utf-8")
            if test:
                assert re.search(rf"^def {re.escape(test)}\(", text, re.M), f"{rid}: no {test} in {file}"
            if section:
                head = rf"^# ## {section}\. " if section.isdigit() else rf"^# ## {section}\s*$"
                assert file.startswith("notebooks/src/"), f"{rid}: § only for notebook sources"
                assert re.search(head, text, re.M), f"{rid}: {file} has no section {section}"


def test_rows_match_the_inventory_and_the_summary():
    rows = _claims()
    per_label = collections.Counter(r[1] for r in rows)
    inventory = {r[0]: int(r[1].strip("*")) for r in _table_with_header(r"notes \d", numeric=True)}
    total = inventory.pop("**total**")
    assert dict(per_label) == inventory, (dict(per_label), inventory)
    assert len(rows) == total >= MIN_CLAIMS
    summary = {r[0]: int(r[1]) for r in _table_with_header(r"covered", numeric=True)}
    assert summary == dict(collections.Counter(r[3] for r in rows))


def test_the_page_stands_on_its_own():
    text = DOC.read_text(encoding="utf-8")
    assert "shared/" not in text and "course-notes" not in text
    assert all(len(line) <= 400 for line in text.splitlines())
