"""Reading a dataset in batches: in-memory tensors are sliced, anything else goes through a
:class:`~torch.utils.data.DataLoader`; unreadable items become one-line errors.

Shared by training (:func:`iter_batches`) and every measurement (:func:`iter_index_batches`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from invariscope.errors import InvariscopeError, hint


class _Indexed(Dataset):
    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, label = self.dataset[i][:2]
        return image, int(label), i


def _worker_message(err: Exception) -> str:
    """The original one-line message of an error re-raised from a DataLoader worker."""
    text = str(err)
    if "Original Traceback" not in text:
        return " ".join(text.split())
    last = [line for line in text.strip().splitlines() if line.strip()][-1]
    return last.split(": ", 1)[1] if ": " in last else last


def _load_error(err: Exception) -> InvariscopeError:
    message = _worker_message(err)
    if isinstance(err, RuntimeError) and "stack expects each tensor to be equal size" in message:
        return InvariscopeError(
            f"the dataset's images differ in size ({message}); give them one size: "
            + hint("load the folder with image_size=N", "pass --image-size N")
            + " (shorter side resized to N, centre crop)"
        )
    return InvariscopeError(
        f"could not read an image of the dataset ({type(err).__name__}: {message}); "
        "fix or remove the file"
    )


def iter_index_batches(
    dataset: Dataset, batches: Sequence[Sequence[int]], *, num_workers: int = 0
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(batch_number, images[B,C,H,W] float32, labels[B] int64, indices[B] int64)``.

    ``batches`` are lists of dataset indices (the batch number is the position in this
    list). In-memory datasets (``images`` / ``labels`` tensors) are sliced; others are
    read through a :class:`~torch.utils.data.DataLoader` with that batch sampler.
    Unreadable items become an :class:`InvariscopeError`.
    """
    images = getattr(dataset, "images", None)
    labels = getattr(dataset, "labels", None)
    if isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor):
        for b, idx in enumerate(batches):
            t = torch.as_tensor(idx, dtype=torch.int64)
            yield b, images[t].float(), labels[t].long(), t
        return
    loader = DataLoader(
        _Indexed(dataset),
        batch_sampler=[list(map(int, idx)) for idx in batches],
        num_workers=num_workers,
    )
    iterator = iter(loader)
    b = 0
    while True:
        try:
            x, y, i = next(iterator)
        except StopIteration:
            return
        except InvariscopeError as err:
            if "Original Traceback" in str(err):  # raised in a worker process
                raise InvariscopeError(_worker_message(err)) from None
            raise
        except (OSError, ValueError, RuntimeError, SyntaxError) as err:
            raise _load_error(err) from err
        yield b, x.float(), torch.as_tensor(y).long(), torch.as_tensor(i).long()
        b += 1


def iter_batches(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(images[B,C,H,W], labels[B], indices[B])`` batches of ``dataset``.

    The order is the dataset order unless ``shuffle``, which draws a permutation from
    ``generator`` (never the global RNG). An empty dataset is a one-line error.
    """
    n = len(dataset)
    if n == 0:
        raise InvariscopeError("the dataset is empty; check --data (and its path or split)")
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    chunks = [order[i : i + batch_size].tolist() for i in range(0, n, batch_size)]
    for _, x, y, idx in iter_index_batches(dataset, chunks):
        yield x, y, idx


def epoch_batches(n: int, steps: int, batch: int, seed: int) -> list[list[int]]:
    """``steps`` minibatches of ``batch`` indices into ``range(n)``, drawn in shuffled
    epochs (a fresh permutation each time the data runs out) from a generator seeded
    with ``seed``: the same seed gives the same batches on every rank and resume.

    >>> epoch_batches(3, 2, 2, seed=0)[0] != epoch_batches(3, 2, 2, seed=1)[0]
    True
    >>> sorted(sum(epoch_batches(4, 2, 2, seed=0), []))
    [0, 1, 2, 3]
    """
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch:
        order += torch.randperm(n, generator=g).tolist()
    return [order[s * batch : (s + 1) * batch] for s in range(steps)]
