"""DataError: every data problem names its place as ``path:line: field 'x': problem``."""
from __future__ import annotations


class DataError(ValueError):
    """A problem with a data file or a data spec.

    ``path`` is the file (or the spec's origin), ``line`` the place inside it: an int for a
    physical line (JSONL, txt, CSV row incl. header as line 1) or a string such as ``"[3]"``
    (JSON array index, parquet row) or ``"[21645374]"`` (JSON object keyed by id).
    ``field`` names the offending field (``conversations[2].value``), ``None`` when the
    problem is the whole line or file.
    """

    def __init__(self, problem: str, path: str | None = None, line: int | str | None = None,
                 field: str | None = None, reason: str | None = None):
        self.problem = problem
        self.path = path
        self.line = line
        self.field = field
        # short machine-readable category used for the "dropped by reason" counts
        self.reason = reason or _default_reason(problem, field)
        super().__init__(self._format())

    @property
    def loc(self) -> str:
        if self.path is None:
            return "" if self.line is None else str(self.line)
        return self.path if self.line is None else f"{self.path}:{self.line}"

    def _format(self) -> str:
        head = self.loc
        body = self.problem if self.field is None else f"field '{self.field}': {self.problem}"
        return f"{head}: {body}" if head else body

    def __reduce__(self):  # picklable across processes
        return (DataError, (self.problem, self.path, self.line, self.field, self.reason))


def _default_reason(problem: str, field: str | None) -> str:
    p = problem.lower()
    for key in ("missing", "empty", "invalid json", "unknown answer", "options", "type",
                "duplicate", "overlength", "role"):
        if key in p:
            return key.replace(" ", "_")
    return "invalid"
