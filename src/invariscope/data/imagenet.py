"""ImageNet-1k class names and WordNet ids, offline, and lookups of folder names.

The table ships with invariscope (``imagenet_classes.tsv``, 1000 lines, one per class in
the standard index order, which is the sorted order of the WordNet ids): ``index``,
``wnid`` (``n01440764``), ``name`` and ``synonyms`` (the synset's words as ImageNet
lists them, ``"tench, Tinca tinca"``). ``name`` is the synset's first word, made unique
where two synsets share it: ``crane (bird)`` (134) / ``crane (machine)`` (517),
``Cardigan Welsh corgi`` (264) / ``cardigan`` (474), ``maillot`` (638) / ``tank suit``
(639).

Lookups (:func:`imagenet_index`) ignore case, treat ``_`` as a space and collapse runs of
white space, so a folder called ``n02123045``, ``tabby``, ``Tabby_cat`` or ``tabby, tabby
cat`` is class 281.

>>> imagenet_index("n01440764"), imagenet_index("Great_White_Shark")
(0, 2)
>>> imagenet_classes()[281], imagenet_wnids()[281]
('tabby', 'n02123045')
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from invariscope.errors import InvariscopeError

__all__ = [
    "IMAGENET_NUM_CLASSES",
    "imagenet_classes",
    "imagenet_index",
    "imagenet_label_map",
    "imagenet_synonyms",
    "imagenet_wnids",
    "is_imagenet_classes",
    "normalize_class_name",
]

#: Number of ImageNet-1k classes.
IMAGENET_NUM_CLASSES = 1000
_TABLE = "imagenet_classes.tsv"


@dataclass(frozen=True)
class _Table:
    wnids: tuple[str, ...]
    names: tuple[str, ...]
    synonyms: tuple[tuple[str, ...], ...]
    lookup: dict[str, int]  # normalised wnid / name / full synset text / unique synonym
    own: tuple[frozenset[str], ...]  # every normalised spelling of class i


def normalize_class_name(text: str) -> str:
    """A class name as lookups compare it: case folded, ``_`` as space, spaces collapsed.

    >>> normalize_class_name("  Great_White   Shark ")
    'great white shark'
    """
    return " ".join(str(text).replace("_", " ").casefold().split())


@lru_cache(maxsize=1)
def _table() -> _Table:
    try:
        text = resources.files("invariscope.data").joinpath(_TABLE).read_text(encoding="utf-8")
    except OSError as exc:
        raise InvariscopeError(
            f"the ImageNet class table {_TABLE} is missing from the invariscope package "
            f"({exc}); reinstall invariscope"
        ) from exc
    rows = [line.split("\t") for line in text.splitlines() if line.strip()]
    if len(rows) != IMAGENET_NUM_CLASSES or any(
        len(r) != 4 or r[0] != str(i) for i, r in enumerate(rows)
    ):
        raise InvariscopeError(
            f"the ImageNet class table {_TABLE} is damaged (expected {IMAGENET_NUM_CLASSES} "
            "lines 'index<TAB>wnid<TAB>name<TAB>synonyms'); reinstall invariscope"
        )
    wnids = tuple(r[1] for r in rows)
    names = tuple(r[2] for r in rows)
    synonyms = tuple(tuple(s.strip() for s in r[3].split(", ")) for r in rows)
    # least specific spellings first, so that more specific ones overwrite them; at
    # each level a spelling shared by two classes (the word "crane") names neither
    lookup: dict[str, int] = {}
    levels = [
        [(normalize_class_name(w), i) for i, words in enumerate(synonyms) for w in words],
        [(normalize_class_name(r[3]), i) for i, r in enumerate(rows)],
        [(normalize_class_name(n), i) for i, n in enumerate(names)],
        [(w.casefold(), i) for i, w in enumerate(wnids)],
    ]
    for level in levels:
        found: dict[str, set[int]] = {}
        for key, i in level:
            found.setdefault(key, set()).add(i)
        for key, owners in found.items():
            if len(owners) == 1:
                lookup[key] = next(iter(owners))
            elif key in lookup and lookup[key] in owners:
                del lookup[key]
    own = tuple(
        frozenset(
            {wnids[i].casefold(), normalize_class_name(names[i]), normalize_class_name(rows[i][3])}
            | {normalize_class_name(w) for w in synonyms[i]}
        )
        for i in range(len(rows))
    )
    return _Table(wnids, names, synonyms, lookup, own)


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names (unique), index = class (``[0] == "tench"``)."""
    return list(_table().names)


def imagenet_wnids() -> list[str]:
    """The 1000 WordNet ids, index = class (``[0] == "n01440764"``; sorted)."""
    return list(_table().wnids)


def imagenet_synonyms() -> list[tuple[str, ...]]:
    """Each class's synset words as ImageNet lists them (``("tabby", "tabby cat")``)."""
    return list(_table().synonyms)


def imagenet_index(name: str) -> int | None:
    """The ImageNet class that ``name`` names, or None.

    ``name`` may be a WordNet id (``n02123045``), a class name of
    :func:`imagenet_classes`, the full synset text (``"tabby, tabby cat"``) or any one of
    the synset's words that no other class shares (``"tabby cat"``); case, ``_`` and
    repeated spaces do not matter.

    >>> imagenet_index("TABBY_CAT"), imagenet_index("crane"), imagenet_index("no such")
    (281, None, None)
    """
    return _table().lookup.get(normalize_class_name(name))


def is_imagenet_classes(names: Sequence[str]) -> bool:
    """True if ``names`` are 1000 names of the ImageNet classes in the standard order.

    Name ``i`` may be any spelling of class ``i``: its WordNet id, name, full synset
    text or one of its synset words (so Keras' and torchvision's lists, which repeat
    ``crane`` and ``maillot``, count too).
    """
    if names is None or len(names) != IMAGENET_NUM_CLASSES:
        return False
    own = _table().own
    return all(normalize_class_name(n) in own[i] for i, n in enumerate(names))


def imagenet_label_map(
    dataset_classes: Sequence[str], model_classes: Sequence[str]
) -> list[int] | None:
    """Model output index for each dataset class, when both speak ImageNet; else None.

    Returns ``[model index of dataset class 0, ...]`` when ``model_classes`` are the
    ImageNet classes (:func:`is_imagenet_classes`) and every dataset class names one
    (:func:`imagenet_index`: WordNet id or name, as ImageNet-style folders are named),
    and the dataset's classes are not the model's already; None otherwise.

    Raises:
        InvariscopeError: two dataset classes name the same ImageNet class.

    >>> imagenet_label_map(["n01443537", "tench"], imagenet_classes())
    [1, 0]
    """
    if not dataset_classes or not is_imagenet_classes(model_classes):
        return None
    if [str(c) for c in dataset_classes] == [str(c) for c in model_classes]:
        return None
    mapped = [imagenet_index(str(c)) for c in dataset_classes]
    if any(m is None for m in mapped):
        return None
    first: dict[int, str] = {}
    for cls, m in zip(dataset_classes, mapped, strict=True):
        if m in first:
            raise InvariscopeError(
                f"dataset classes '{first[m]}' and '{cls}' both name ImageNet class {m} "
                f"({imagenet_classes()[m]}); merge their folders"
            )
        first[m] = str(cls)
    return [int(m) for m in mapped]  # type: ignore[arg-type]
