"""The `EditRequest` type: one fact to rewrite, validated on construction; and `METHODS`, the editing
methods a request may be computed with (one tuple for the maths and the control plane)."""

from __future__ import annotations

from dataclasses import dataclass

from editserve.errors import InvalidRequestError

MAX_TEXT_CHARS = 2000
METHODS = ("rome", "memit", "alphaedit", "gated")


@dataclass(frozen=True)
class EditRequest:
    """Rewrite the fact `prompt.format(subject)` → `target_new`.

    prompt:      a template containing exactly one ``{}`` where the subject goes,
                 e.g. ``"{} is located in the city of"``.
    subject:     the entity whose fact changes, e.g. ``"The Eiffel Tower"``.
    target_new:  the new object as it continues the prompt, usually with a leading
                 space, e.g. ``" Rome"``.
    target_true: optional current object (used by evaluation and probes only).
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None

    def __post_init__(self) -> None:
        for name in ("prompt", "subject", "target_new"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise InvalidRequestError(f"{name} must be a string, got {type(value).__name__}: {value!r}")
            if len(value) > MAX_TEXT_CHARS:
                raise InvalidRequestError(f"{name} is {len(value)} characters long; the limit is {MAX_TEXT_CHARS}")
        if self.target_true is not None and not isinstance(self.target_true, str):
            raise InvalidRequestError(f"target_true must be a string or None, got {self.target_true!r}")
        if self.prompt.count("{}") != 1:
            raise InvalidRequestError(
                f"prompt must contain exactly one '{{}}' placeholder for the subject, got {self.prompt!r}"
            )
        stray = self.prompt.replace("{}", "")
        if "{" in stray or "}" in stray:
            raise InvalidRequestError(f"prompt may contain no braces besides the '{{}}' placeholder: {self.prompt!r}")
        if not self.subject.strip():
            raise InvalidRequestError(f"subject must not be empty, got {self.subject!r}")
        if not self.target_new.strip():
            raise InvalidRequestError(f"target_new must not be empty, got {self.target_new!r}")
        if self.prompt.endswith(" ") and self.target_new.startswith(" "):
            raise InvalidRequestError(
                f"prompt {self.prompt!r} ends with a space and target_new {self.target_new!r} starts with one"
            )

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.format(self.subject)

    @classmethod
    def from_sentence(cls, sentence: str, subject: str, target_new: str, target_true: str | None = None) -> "EditRequest":
        """Build a request from a prompt that contains the subject literally (CounterFact style)."""
        if not subject or subject not in sentence:
            raise InvalidRequestError(f"subject {subject!r} does not occur in prompt {sentence!r}")
        escaped = sentence.replace("{", "(").replace("}", ")")
        at = escaped.index(subject)
        template = escaped[:at] + "{}" + escaped[at + len(subject):]
        return cls(prompt=template, subject=subject, target_new=target_new, target_true=target_true)

    def to_dict(self) -> dict[str, str | None]:
        return {"prompt": self.prompt, "subject": self.subject,
                "target_new": self.target_new, "target_true": self.target_true}
