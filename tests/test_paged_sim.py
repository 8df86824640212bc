"""`minilora paged-sim`: the spike trace kills the unpaged run at the spike step and is survived with paging, for
QLoRA 7B on 24 GB, 65B on 48 GB and the tiny real-array model, with 32-bit and 8-bit AdamW states; the --json shape;
bad input is a clear ValueError."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minilora.apps import paged_sim
from minilora.apps.paged_sim import check_trace, get_scenario, main, make_trace, replay, room, run_scenario

GB = 10 ** 9


@pytest.fixture(scope="module", params=[(m, o) for o in ("adamw", "adamw8bit") for m in ("7b", "65b", "tiny")],
                ids=lambda mo: "-".join(mo))
def spike_run(request):
    model, optim = request.param
    return run_scenario(model, steps=30, seed=1, optim=optim)


def test_unpaged_ooms_at_the_first_spike_and_paged_survives_it(spike_run):
    s, u, p = spike_run["scenario"], spike_run["unpaged"], spike_run["paged"]
    first_spike = next(i + 1 for i, n in enumerate(s["trace"]) if n > s["longest_seq_states_resident"])
    assert u["completed"] is False and u["oom_step"] == first_spike
    assert f"step {first_spike}: out of device memory" in u["error"] and "'activations'" in u["error"]
    assert "optimizer_state" in u["error"] and "paging is off" in u["error"]
    assert u["oom_request"]["kind"] == "activations"
    assert p["completed"] is True and p["steps_run"] == s["steps"] and p["oom_step"] is None
    assert p["peak_device_bytes"] <= s["budget_bytes"] == p["budget_bytes"]
    assert p["bytes_evicted"] > 0 and p["bytes_prefetched"] == p["bytes_evicted"] and p["bytes_faulted"] == 0
    assert p["transfer_seconds"] == pytest.approx(2 * p["bytes_evicted"] / 8e9)   # 125 ms per GB each way
    moved = [d for d in p["per_step"] if d["bytes_evicted"]]
    assert {d["step"] for d in moved} == {i + 1 for i, n in enumerate(s["trace"]) if n == s["trace"][first_spike - 1]}
    assert sum(d["transfer_seconds"] for d in p["per_step"]) == pytest.approx(p["transfer_seconds"])
    assert s["optim"] == p["optim"] == u["optim"]
    assert s["optimizer"] == {"adamw": "PagedAdamW", "adamw8bit": "PagedAdamW8bit"}[s["optim"]]
    if s["model"] == "tiny":
        assert p["bit_identical_to_adamw"] is True                    # 8-bit: parameters and every state byte


def test_model_numbers_are_the_qlora_recipe():
    for model, budget, n_states in (("7b", 24, 2 * 32 * 7 * 2), ("65b", 48, 2 * 80 * 7 * 2)):
        scn = get_scenario(model)
        assert scn.budget_bytes == budget * GB and len(scn.adapter_shapes) * 2 == n_states
        r = room(scn, scn.budget_bytes)
        assert r["states"] == 2 * 4 * sum(scn.numels)                # fp32 m and v: paged_adamw_32bit
        assert all(n >= 100_000 for n in scn.numels)                  # every LoRA A/B state is paged (bnb's rule)
    assert sum(get_scenario("7b").numels) == 159_907_840              # r=64 on q,k,v,o,gate,up,down of 32 blocks
    assert get_scenario("7b").source == "minilora.memory"             # the calculator, not the fallback


def test_8bit_states_are_codes_plus_absmax():
    for model in ("7b", "65b"):
        scn = get_scenario(model)
        r8, r32 = room(scn, scn.budget_bytes, optim="adamw8bit"), room(scn, scn.budget_bytes)
        assert r8["states"] == sum(2 * n + 2 * 4 * -(-n // 256) for n in scn.numels)   # uint8 m, v + float32 absmax
        assert r8["unpaged_states"] == sum(2 * 4 * -(-n // 256) for n in scn.numels)   # absmax stays on the device
        assert r8["states"] * 8 / r32["states"] == pytest.approx(2 + 8 / 256)           # 2.03 B per parameter
    assert round(room(get_scenario("65b"), 48 * GB, optim="adamw8bit")["states"] / GB, 2) == 1.62
    tiny = get_scenario("tiny")                                       # the 512-element biases stay float32 (< 4096)
    assert room(tiny, tiny.budget_bytes, optim="adamw8bit")["states"] == 4 * (2 * 131072 + 8 * 512) + 4 * 8 * 512


def test_8bit_without_prefetch_is_still_bit_identical():
    res = run_scenario("tiny", steps=12, seed=3, prefetch=False, optim="adamw8bit")["paged"]
    assert res["completed"] and res["page_faults"] > 0 and res["bit_identical_to_adamw"] is True


def test_no_prefetch_faults_page_by_page_and_costs_more():
    with_pf = run_scenario("tiny", steps=25, seed=2)["paged"]
    without = run_scenario("tiny", steps=25, seed=2, prefetch=False)["paged"]
    assert without["completed"] and without["page_faults"] > 0 and without["prefetches"] == 0
    assert without["bytes_faulted"] == without["bytes_evicted"] and without["bytes_prefetched"] == 0
    assert without["transfer_seconds"] > with_pf["transfer_seconds"]
    assert without["bit_identical_to_adamw"] is True


def test_without_gradient_checkpointing_activations_are_bigger():
    on = run_scenario("7b", steps=3)["scenario"]
    off = run_scenario("7b", steps=3, gradient_checkpointing=False)["scenario"]
    assert off["longest_seq_states_resident"] < on["longest_seq_states_resident"] / 5


def test_a_spike_too_big_even_for_paging_is_an_oom_in_both():
    res = run_scenario("tiny", steps=5, trace=[10, 10, 100_000, 10])
    assert res["unpaged"]["oom_step"] == 3 and res["paged"]["oom_step"] == 3
    assert "even after evicting" in res["paged"]["error"]


@settings(max_examples=15, deadline=None)
@given(trace=st.lists(st.integers(0, 300), min_size=1, max_size=12), budget_mb=st.floats(9.5, 14.0),
       page_kib=st.sampled_from([4, 16, 64, 2048]), prefetch=st.booleans())
def test_random_traces_never_exceed_the_budget_and_complete_when_they_can(trace, budget_mb, page_kib, prefetch):
    scn = get_scenario("tiny")
    budget = int(budget_mb * 1e6)
    res = replay(scn, trace, budget, paging=True, page_size=page_kib * 1024, prefetch=prefetch)
    assert res["peak_device_bytes"] <= budget
    r = room(scn, budget)
    worst = max(scn.activation_fn(n, scn.batch_size, True) for n in trace)
    largest_param_states = 2 * 4 * max(scn.numels)
    if worst <= r["free_evicted"] and largest_param_states <= r["free_evicted"]:
        assert res["completed"], res["error"]                          # paging must rescue every feasible trace
        assert res["bit_identical_to_adamw"] is True
    if worst > r["free_evicted"]:
        assert not res["completed"]


def test_cli_json_prints_exactly_one_object(capsys):
    assert main(["--model", "tiny", "--json", "--steps", "12"]) == 0
    out = capsys.readouterr().out
    obj = json.loads(out)                                              # the whole stdout is one JSON value
    assert set(obj) >= {"unpaged", "paged", "scenario"}
    assert isinstance(obj["unpaged"]["oom_step"], int)
    for key, typ in (("completed", bool), ("peak_device_bytes", int), ("budget_bytes", int), ("bytes_evicted", int),
                     ("bytes_prefetched", int), ("transfer_seconds", float)):
        assert isinstance(obj["paged"][key], typ), key
    assert obj["paged"]["completed"] is True and "timeline" not in obj["paged"]


def test_cli_summary_and_figure(tmp_path, capsys):
    fig = tmp_path / "timeline.png"
    assert main(["--model", "tiny", "--steps", "10", "--figure", str(fig)]) == 0
    out = capsys.readouterr().out
    assert "without paging: OutOfMemoryError at step" in out and "completed 10/10 steps" in out
    assert "bit-identical to plain AdamW: True" in out and "optimizer: PagedAdamW (paged_adamw_32bit)" in out
    png = fig.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    res = run_scenario("tiny", steps=10)
    paged_sim.plot_timeline(res, tmp_path / "again.png")
    assert (tmp_path / "again.png").read_bytes() == png                # deterministic output


def test_cli_optim_adamw8bit(capsys):
    assert main(["--model", "tiny", "--optim", "adamw8bit", "--steps", "10"]) == 0
    out = capsys.readouterr().out
    assert "optimizer: PagedAdamW8bit (paged_adamw_8bit), unpaged baseline AdamW8bit" in out
    assert "without paging: OutOfMemoryError at step" in out
    assert "with paging (PagedAdamW8bit, prefetch on): completed 10/10 steps" in out
    assert "parameters and state bytes bit-identical to plain AdamW8bit: True" in out
    assert main(["--model", "65b", "--optim", "adamw8bit", "--steps", "3", "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["scenario"]["optim"] == "adamw8bit" and obj["scenario"]["bnb_name"] == "paged_adamw_8bit"


@pytest.mark.parametrize("kw, match", [
    ({"model": "7b", "budget_gb": 3.0}, "smaller than the weights alone"),
    ({"model": "65b", "budget_gb": 24.0}, "smaller than the weights alone"),
    ({"model": "tiny", "page_size": 0}, "page size"),
    ({"model": "tiny", "page_size": 6}, "not a multiple of the element size"),
    ({"model": "tiny", "trace": [10, -3, 5]}, "trace step 2: sequence length -3"),
    ({"model": "tiny", "trace": []}, "empty"),
    ({"model": "3b"}, "unknown model"),
    ({"model": "tiny", "optim": "sgd"}, "unknown optimizer 'sgd'"),
    ({"model": "tiny", "optim": "adamw8bit", "page_size": 4100}, "straddle two pages"),
])
def test_bad_input_is_a_clear_value_error(kw, match):
    with pytest.raises(ValueError, match=match):
        run_scenario(**kw)


def test_replay_checks_the_budget_too():
    with pytest.raises(ValueError, match="smaller than the weights alone"):
        replay(get_scenario("tiny"), [1, 2], 999_999, paging=True, page_size=4096)


def test_cli_bad_input_exits_2_with_the_message(capsys):
    assert main(["--model", "7b", "--budget-gb", "2"]) == 2
    assert "smaller than the weights alone" in capsys.readouterr().err
    assert main(["--model", "tiny", "--page-size", "0"]) == 2


def test_trace_helpers():
    t = make_trace(20, 100, 500, seed=0)
    assert len(t) == 20 and 500 in t and t[0] != 500 and all(50 <= n <= 100 for n in t if n != 500)
    assert make_trace(20, 100, 500, seed=0) == t                      # seeded
    with pytest.raises(ValueError):
        check_trace([1, 2.5])
