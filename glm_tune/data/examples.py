"""What every reader returns and every prompt format takes: an `Example` (question, answer, history, or a
whole conversation of `ChatTurn`s), and the error bad input raises."""
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from glm_tune.errors import GlmTuneError


IGNORE_INDEX = -100


class DataFormatError(GlmTuneError):
    """Input data that cannot be used; the message names the file, the line and what to fix."""


@dataclass
class Example:
    src: str
    tgt: str = ""
    history: List[Tuple[str, str]] = field(default_factory=list)
    conversation: Optional[list] = None  # ChatTurns of a `conversations` record (roles, tools, per-message loss)




@dataclass
class ChatTurn:
    """One message: role system | user | assistant | observation; an assistant tool call carries the tool's name
    as `metadata` (ChatGLM3)."""
    role: str
    content: str
    metadata: str = ""
    loss: Optional[bool] = None  # learned? None: assistant turns are, the others are not

    @property
    def learned(self) -> bool:
        return self.role == "assistant" if self.loss is None else self.loss
