"""LLaVA-Instruct JSON (a list of ``{id, image, conversations: [{from, value}, …]}``) → VQA rows.

Turns alternate human/gpt (``user``/``assistant`` accepted too); ``<image>`` is removed from the
text (the model places the image itself). LLaVA-Instruct repeats ``id`` legitimately (it is the
image's id and one image has several conversations), so every record is kept and its
``sample_id`` carries the record index: ``vqa/train/<id>/r<index>`` — unique by construction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from pixellm.data.formats.common import (
    Collector,
    Id,
    Record,
    Specs,
    Text,
    expect,
    image_path,
    read_json,
    row_spec,
    validate,
)
from pixellm.data.schema import Reject

__all__ = ["LlavaRecord", "LlavaTurn", "parse_llava"]

_ROLES = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant"}


class LlavaTurn(Record):
    from_: Literal["human", "gpt", "user", "assistant"] = Field(alias="from")
    value: Text


class LlavaRecord(Record):
    """One conversation about one image."""

    id: Id | None = None
    image: Annotated[Text, Field(min_length=1)]
    conversations: Annotated[list[LlavaTurn], Field(min_length=2)]

    @model_validator(mode="after")
    def _alternating(self) -> LlavaRecord:
        if len(self.conversations) % 2:
            raise ValueError(f"{len(self.conversations)} turns; expected user/assistant pairs")
        for t, turn in enumerate(self.conversations):
            want = "user" if t % 2 == 0 else "assistant"
            if _ROLES[turn.from_] != want:
                raise ValueError(f"turn {t} is from {turn.from_!r}; expected alternating human/gpt")
        return self


def _row(rec: LlavaRecord, r: int, sp: str, corpus: str, images: Path, file: str) -> list[dict]:
    conv = [
        {"role": _ROLES[t.from_], "text": t.value.replace("<image>", "").strip()}
        for t in rec.conversations
    ]
    return [
        row_spec(
            sample_id=f"{corpus}/{sp}/{rec.id if rec.id is not None else '-'}/r{r}",
            corpus=corpus,
            split=sp,
            task="vqa",
            image=image_path(images, rec.image),
            hw=(None, None),
            conv=conv,
            targets=[],
            file=file,
            record=f"[{r}]",
            meta={"file_name": rec.image, "id": rec.id},
        )
    ]


def parse_llava(
    path: Path, images: Path | None, corpus: str, split: str | None
) -> tuple[Specs, list[Reject]]:
    """Read one LLaVA-Instruct JSON file (or the first ``*.json`` of a directory).

    Raises:
        DataError: the file cannot be read or is not a JSON list.
    """
    file = (
        path if path.is_file() else next(iter(sorted(path.glob("*.json"))), path / "missing.json")
    )
    images = images or (file.parent.parent / "images")
    sp = split or "train"
    records = expect(read_json(file), list, file, "the top level (a list of conversations)")
    out = Collector()
    for r, item in enumerate(records):
        out.run(
            file.name,
            f"[{r}]",
            sp,
            lambda item=item, r=r: _row(
                validate(LlavaRecord, item), r, sp, corpus, images, file.name
            ),
        )
    return out.result()
