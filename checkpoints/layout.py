"""Names on disk: checkpoint directory names, file names, and prefixes of transient dirs.

A checkpoint directory is ``epoch-EEEEEE`` for a save at a round boundary,
``epoch-EEEEEE-step-SSSSSS`` for a mid-round save (``inner_step > 0``), either one
optionally followed by ``-TAG``. Only names this module produces are recognised, so a
stray directory can never be mistaken for a checkpoint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from checkpoints.errors import CheckpointError

META_FILE = "meta.msgpack"
TENSOR_SUFFIX = ".safetensors"
# A save in progress, or a directory renamed away for deletion: always garbage after a crash.
TMP_PREFIX = ".tmp-"
# A checkpoint renamed away while being replaced by a newer save of the same name;
# after a crash it is renamed back unless the replacement made it into place.
OLD_PREFIX = ".old-"

_NAME = re.compile(r"^epoch-(\d{6,})(?:-step-(\d{6,}))?(?:-([A-Za-z0-9_][A-Za-z0-9_.]*))?$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.]{0,63}$")
_GROUP = re.compile(r"^[A-Za-z0-9_]{1,64}$")


@dataclass(frozen=True, kw_only=True)
class CheckpointName:
    """The parsed name of a checkpoint directory."""

    epoch: int
    inner_step: int
    tag: str | None

    @property
    def dirname(self) -> str:
        name = f"epoch-{self.epoch:06d}"
        if self.inner_step:
            name += f"-step-{self.inner_step:06d}"
        if self.tag is not None:
            name += f"-{self.tag}"
        return name

    @classmethod
    def parse(cls, dirname: str) -> CheckpointName | None:
        """The name's parts, or None if ``dirname`` is not a checkpoint directory name."""
        match = _NAME.match(dirname)
        if match is None:
            return None
        epoch, step, tag = match.groups()
        name = cls(epoch=int(epoch), inner_step=int(step or 0), tag=tag)
        # Reject non-canonical spellings (extra leading zeros, "-step-000000") so that
        # two directories can never stand for the same checkpoint.
        return name if name.dirname == dirname else None


def check_tag(tag: str | None) -> str | None:
    if tag is not None and not (isinstance(tag, str) and _TAG.match(tag)):
        raise CheckpointError(
            f"invalid checkpoint tag {tag!r}: use up to 64 letters, digits, '_' or '.', not starting with '.'"
        )
    return tag


def is_count(value: object) -> bool:
    """An epoch, a step or a count: a non-negative int (bool, an int to Python, is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_valid_group(group: object) -> bool:
    return isinstance(group, str) and _GROUP.match(group) is not None


def tensor_file(group: str) -> str:
    return group + TENSOR_SUFFIX
