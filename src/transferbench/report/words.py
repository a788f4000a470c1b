"""How numbers and tables are said in the report: signed percentage points, intervals, sizes, multipliers,
markdown tables."""

import math
import re

import pandas as pd


def pp(x: float) -> str:
    return "n/a" if pd.isna(x) else f"{100 * x:+.1f}"


def per_class(n: int) -> str:
    return f"{n} example{'s' if n != 1 else ''} per class"


def interval(row) -> str:
    """'+12.3 pp [+8.1, +16.5]' for a row with gain, ci_low and ci_high."""
    return f"{pp(row.gain)} pp [{pp(row.ci_low)}, {pp(row.ci_high)}]"


def times(x: float) -> str:
    """A multiplier: 'x4.2', 'x0.8'."""
    return "n/a" if pd.isna(x) else "x inf" if math.isinf(x) else f"x{x:.2g}" if x < 10 else f"x{x:.0f}"


def markdown_table(df: pd.DataFrame) -> str:
    cols = [md_cell(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(md_cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def md_cell(value) -> str:
    """A value as one markdown table cell: a `|` would end the cell and a line break the row (a weights path or an
    error message may hold either), so values never move under another heading."""
    one_line = re.sub(r"[\r\n]+", " ", str(value))
    return re.sub(r"(\\*)\|", lambda m: 2 * m.group(1) + "\\|", one_line)  # backslashes before a | escaped too


def near_the_level_clause(decided: int, undecided: int, fdr: float) -> str:
    """The clause that says how many verdicts rest on a q-value near the level ('' when none does)."""
    if not decided and not undecided:
        return ""
    return (f"; {decided} of these verdicts and {undecided} inconclusive point{'s' if undecided != 1 else ''} have q "
            f"within a factor of two of {fdr:g}, where a rerun on a host with other float rounding can flip them")
