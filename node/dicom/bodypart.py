"""Body part normalisation: BodyPartExamined, descriptions (English and Russian) and protocol names ->
normalised body parts (BodyPartExamined-style Defined Terms). Pure: no disk, database or network."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Normalised body parts (DICOM BodyPartExamined-style Defined Terms); normalise_body_part yields these.
BODY_PARTS = frozenset(
    {"CHEST", "HEAD", "NECK", "ABDOMEN", "PELVIS", "PROSTATE", "SPINE", "EXTREMITY", "BREAST", "HEART", "WHOLEBODY"}
)


def _terms(spec: dict[str, str]) -> dict[str, frozenset[str]]:
    """{"CHEST THORAX": "CHEST", ...} -> {"CHEST": {CHEST}, "THORAX": {CHEST}, ...} (parts space-separated)."""
    return {term: frozenset(parts.split()) for terms, parts in spec.items() for term in terms.split()}


# BodyPartExamined values (compacted: upper case, no spaces, '_' or '-') -> normalised body parts.
_EXAMINED = _terms(
    {
        "CHEST THORAX LUNG LUNGS RIB RIBS STERNUM MEDIASTINUM": "CHEST",
        "CHESTABDOMEN CHESTABD THORAXABDOMEN": "CHEST ABDOMEN",
        "CHESTABDPELVIS CHESTABDOMENPELVIS CHESTTOPELVIS THORAXABDOMENPELVIS TORSO": "CHEST ABDOMEN PELVIS",
        "ABDOMEN ABD LIVER KIDNEY PANCREAS": "ABDOMEN",
        "ABDOMENPELVIS ABDPELVIS ABDOMENANDPELVIS": "ABDOMEN PELVIS",
        "PELVIS HIP BLADDER": "PELVIS",
        "PROSTATE": "PROSTATE",
        "HEAD BRAIN SKULL ORBIT": "HEAD",
        "HEADNECK HEADANDNECK": "HEAD NECK",
        "NECK LARYNX THYROID": "NECK",
        "SPINE CSPINE TSPINE LSPINE SSPINE CTSPINE TLSPINE LSSPINE WHOLESPINE SACRUM COCCYX": "SPINE",
        "EXTREMITY UPPEREXTREMITY LOWEREXTREMITY ARM LEG HAND FOOT KNEE SHOULDER ELBOW WRIST ANKLE FEMUR"
        " TIBIA FINGER TOE FOREARM": "EXTREMITY",
        "BREAST": "BREAST",
        "HEART CARDIAC CORONARY CORONARYARTERY": "HEART",
        "WHOLEBODY": "WHOLEBODY",
    }
)


@dataclass(frozen=True)
class _Keyword:
    """A pattern over normalised description words; ignored when a firm hit found one of `unless`."""

    pattern: re.Pattern[str]
    parts: frozenset[str]
    unless: frozenset[str] = frozenset()


def _kw(pattern: str, parts: str, unless: str = "") -> _Keyword:
    return _Keyword(re.compile(rf"\b(?:{pattern})"), frozenset(parts.split()), frozenset(unless.split()))


# Patterns run on lower-cased words joined by single spaces (ё -> е); `\b` opens each pattern, and a
# trailing `\b` makes a whole word, `\w*` a stem ("грудн" matches "грудной", "таз" never "метастаз").
# Adjectives that also name a spine level (thoracic, грудной, шейный) or a gland (грудных желез) are
# weak: they do not count when the same text names the spine or the breast.
_KEYWORDS = (
    _kw(r"chest\b|lungs?\b|thorax\b|pulmo\w*|ctpa\b", "CHEST"),
    _kw(r"thoracic\b", "CHEST", unless="SPINE"),
    _kw(r"огк\b|легк\w*|легоч\w*|торакс\w*", "CHEST"),
    _kw(r"грудн\w*|торакал\w*", "CHEST", unless="SPINE BREAST"),
    _kw(r"head\b|brain\b|skull\b|crani\w*", "HEAD"),
    _kw(r"голов(?!к)\w*|гм\b|череп\w*", "HEAD"),
    _kw(r"мозг\w*", "HEAD", unless="SPINE"),
    _kw(r"neck\b|ше[яиюй]\b|шеей\b", "NECK"),
    _kw(r"шейн\w*", "NECK", unless="SPINE"),
    _kw(r"abdom\w*|abd\b|брюшн\w*|обп\b|живот\w*|абдомин\w*", "ABDOMEN"),
    _kw(r"pelvi\w*|таз\w*|омт\b|omt\b", "PELVIS"),
    _kw(r"prostat\w*|простат\w*|предстат\w*", "PROSTATE"),
    _kw(r"spine\b|spinal\b|[clt]spine\b|lumbar\b|vertebr\w*|позвон\w*|спинн\w*", "SPINE"),
    _kw(r"knee\b|hand\b|foot\b|ankle\b|wrist\b|elbow\b|shoulder\b|extremit\w*|колен\w*|конечност\w*", "EXTREMITY"),
    _kw(r"breast\b|mammo\w*|молочн\w*|маммо\w*|грудн\w* желез\w*", "BREAST"),
    _kw(r"heart\b|cardi\w*|coronar\w*|сердц\w*|сердеч\w*|коронар\w*|кардио\w*", "HEART"),
    _kw(r"whole ?body\b|total body\b|всего тела\b|все тело\b", "WHOLEBODY"),
)

_WORD_RE = re.compile(r"[^\W\d_]+")
_CYRILLIC_RE = re.compile(r"[а-я]")
_LATIN_RE = re.compile(r"[a-z]")
_LOOKALIKES = str.maketrans("aceopxykmthb", "асеорхукмтнв")  # Latin letters typed for Cyrillic ones


def _words(text: str) -> str:
    """Lower-cased letter runs joined by spaces; a word mixing Latin lookalikes into Cyrillic is fixed."""
    words = []
    for word in _WORD_RE.findall(text.casefold().replace("ё", "е")):
        if _CYRILLIC_RE.search(word) and _LATIN_RE.search(word):
            word = word.translate(_LOOKALIKES)
        words.append(word)
    return " ".join(words)


def _from_text(text: str) -> set[str]:
    words = _words(text)
    hits = [kw for kw in _KEYWORDS if kw.pattern.search(words)]
    firm = {part for kw in hits if not kw.unless for part in kw.parts}
    return firm | {part for kw in hits if kw.unless and not kw.unless & firm for part in kw.parts}


def normalise_body_part(body_part_examined: str | None, *descriptions: str | None) -> frozenset[str]:
    """Normalised body parts (BODY_PARTS) of a series.

    A recognised BodyPartExamined wins alone; otherwise keywords (English and Russian) are searched in
    the descriptions (StudyDescription, SeriesDescription, ProtocolName) and in an unrecognised
    BodyPartExamined. Nothing recognised gives an empty set. Raises nothing.
    """
    texts = descriptions
    if body_part_examined and body_part_examined.strip():
        parts = _EXAMINED.get(re.sub(r"[\W_]+", "", body_part_examined).upper())
        if parts:
            return parts
        texts = (body_part_examined, *descriptions)
    found: set[str] = set()
    for text in texts:
        if text:
            found |= _from_text(text)
    return frozenset(found)
