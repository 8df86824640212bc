"""Byte units, one definition each: GB = 10^9 bytes (what papers and GPU spec sheets mean), MiB = 2^20 bytes (what
allocators and tracemalloc count), and one `fmt_bytes` that every report prints sizes with."""
from __future__ import annotations

KB = 10 ** 3
MB = 10 ** 6
GB = 10 ** 9
KiB = 2 ** 10
MiB = 2 ** 20
GiB = 2 ** 30


def fmt_bytes(n: float) -> str:
    """A size for a report: GB (decimal) from 0.1 GB up, MiB from 1 MiB, KiB from 1 KiB, whole bytes below.

    fmt_bytes(3.5e9) == '3.50 GB', fmt_bytes(3 * MiB) == '3.00 MiB', fmt_bytes(400) == '400 B'."""
    if abs(n) >= 0.1 * GB:
        return f"{n / GB:,.2f} GB"
    if abs(n) >= MiB:
        return f"{n / MiB:,.2f} MiB"
    if abs(n) >= KiB:
        return f"{n / KiB:,.2f} KiB"
    return f"{int(n)} B"
