"""The content policy: operator rules, checked on the prompt, explained when they refuse.

Hosted video APIs refuse harmless prompts as "too sensitive" and say nothing more. Here a
refusal names the rule that fired, where in the prompt it matched and what it matched, so a
user can see why and an operator can see which rule to fix. Off unless configured.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from serving.config import ContentPolicyConfig


@dataclass(frozen=True)
class Violation:
    rule_id: str
    field: str
    start: int
    end: int
    matched: str
    reason: str

    def describe(self) -> str:
        why = f": {self.reason}" if self.reason else ""
        return (f"{self.field} matched content rule {self.rule_id!r} at characters {self.start}-{self.end} "
                f"({self.matched!r}){why}")


class PolicyViolation(Exception):
    def __init__(self, violation: Violation):
        self.violation = violation
        super().__init__(violation.describe())


class ContentPolicy:
    def __init__(self, config: ContentPolicyConfig):
        self.enabled = config.enabled
        self.rules = []
        for rule in config.rules:
            patterns = [re.compile(rf"\b{re.escape(term)}\b", re.IGNORECASE) for term in rule.terms]
            if rule.regex is not None:
                patterns.append(re.compile(rule.regex))
            self.rules.append((rule, patterns))

    def check(self, text: str, field: str) -> Violation | None:
        """The earliest match of any rule in `text`, or None."""
        if not self.enabled:
            return None
        found = None
        for rule, patterns in self.rules:
            for pattern in patterns:
                match = pattern.search(text)
                if match and (found is None or match.start() < found.start):
                    found = Violation(rule.id, field, match.start(), match.end(), match.group(0), rule.message)
        return found
