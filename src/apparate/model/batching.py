"""Model-ready batches of a stream: in order for training and recording, and of any size (and
text length) for the profiler. A stream is anything with `len()` and `item(i)` returning an
object with `.input`, `.label` and `.cost` (the zoo's `Stream`)."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

from apparate.model.training import Batch

Encode = Callable[..., Any]  # raw inputs -> model inputs (text encoders also take pad_to=)


def encode_batches(stream: Any, encode: Encode, batch_size: int = 128) -> Iterator[Batch]:
    """The stream's inputs, encoded, in order, `batch_size` at a time."""
    if batch_size < 1:
        raise ValueError("batch size must be at least 1")
    for s in range(0, len(stream), batch_size):
        items = [stream.item(i) for i in range(s, min(len(stream), s + batch_size))]
        yield Batch(encode([it.input for it in items]), [it.label for it in items], [it.cost for it in items])


def batch_maker(stream: Any, encode: Encode, text: bool) -> Callable[[int, int | None], Any]:
    """(batch size, length) -> a model input of real inputs, for the profiler. Text inputs are
    padded or cut to exactly `length` tokens, so each bucket costs what a batch of that length
    costs whatever the sentences say."""
    def make(b: int, length: int | None) -> Any:
        items: Sequence[Any] = [stream.item(i % len(stream)).input for i in range(b)]
        if length is None or not text:
            return encode(items)
        return encode(items, pad_to=length)
    return make
