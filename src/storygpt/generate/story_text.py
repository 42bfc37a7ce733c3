"""The text of a story as it grows token by token: each new token's piece appended to the text so far (O(1) a
token rather than decoding the whole row again), and where a stop string cuts it."""

from __future__ import annotations

import functools


def extended_text(tokenizer, row: list[int], text: str, token: int) -> str:
    """`tokenizer.decode(row + [token])`, given `text` = `tokenizer.decode(row)`: the text grows by the new
    token's piece when both it and the row's last token are plain pieces (`piece_texts`), else the row is decoded
    again. A story's text then costs O(1) per token instead of O(its length)."""
    pieces = piece_texts(tokenizer)
    if row and max(token, row[-1]) < len(pieces) and pieces[token] is not None and pieces[row[-1]] is not None:
        return text + pieces[token]
    return tokenizer.decode(row + [token])


@functools.cache
def piece_texts(tokenizer) -> list[str | None]:
    """Per token id, the text it adds after another such token (its piece, "▁" as a space), or None for
    byte, control, unknown and unused tokens and the start- and end-of-story tokens. SentencePiece decodes a
    plain piece that follows a plain piece by appending it: only the text's first piece loses its leading
    space, and byte pieces combine into UTF-8 characters (so a row ending in one is decoded again)."""
    sp = tokenizer.sp
    special = {tokenizer.bos_id, tokenizer.eos_id}
    return [None if i in special or sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)
            else sp.id_to_piece(i).replace("▁", " ") for i in range(sp.get_piece_size())]


def first_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None
