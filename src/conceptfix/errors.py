"""User-facing errors: one line, naming the field and the fix. The CLI prints them without a traceback."""


class ConceptfixError(Exception):
    """A mistake in the user's input or environment that the user can fix.

    `field` names what was wrong (a CLI option, a JSON key, a YAML field); `hint` says how to fix it.
    """

    def __init__(self, message: str, *, field: str | None = None, hint: str | None = None):
        self.field = field
        self.hint = hint
        super().__init__(message)

    def one_line(self) -> str:
        parts = []
        if self.field:
            parts.append(f"{self.field}: ")
        parts.append(str(self))
        if self.hint:
            parts.append(f" ({self.hint})")
        return "".join(parts).replace("\n", " ")
