"""``PatchReport``: what a ``unit_fast.patch_*`` call replaced, and what it left and why."""

from dataclasses import dataclass, field


@dataclass
class PatchReport:
    """entries: ``(where, before, after)`` for each replacement; skipped: ``(where, reason)``."""

    entries: list = field(default_factory=list)
    skipped: list = field(default_factory=list)

    @property
    def replaced(self):
        """How many things were replaced."""
        return len(self.entries)

    def __str__(self):
        lines = [f"unit_fast patched {self.replaced} item(s):"]
        lines += [f"  {where}: {before} -> {after}" for where, before, after in self.entries]
        if self.skipped:
            lines.append(f"left as they were ({len(self.skipped)}):")
            lines += [f"  {where}: {reason}" for where, reason in self.skipped]
        return "\n".join(lines)
