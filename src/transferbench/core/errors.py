"""The one error type users see: it names the field and the fix (the CLI exits 2 on it)."""

import difflib


class ConfigError(ValueError):
    """Bad input: a study file, an override, a name, a file. Never raised after training began."""

    def __init__(self, field: str, problem: str, fix: str = ""):
        self.field, self.problem, self.fix = field, problem, fix
        super().__init__(f"{field}: {problem}" + (f" -- fix: {fix}" if fix else ""))

    def at(self, field: str) -> "ConfigError":
        """The same error named by a more precise field (a lower layer says `backbones.weights`, planning knows
        it is `backbones.1.weights`)."""
        return ConfigError(field, self.problem, self.fix)


def did_you_mean(name: str | int, choices) -> str:
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f"did you mean '{close[0]}'?" if close else f"choose one of: {', '.join(sorted(map(str, choices)))}"
