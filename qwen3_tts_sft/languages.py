"""The languages a row may name: what Qwen3-TTS's configs call them, and what a user likely meant.

The trainer checks rows against its model's own languages (talker_config.codec_language_id).
prepare_codes.py may have only the speech tokenizer: it checks against the config of the model
folder the tokenizer sits in (speech_tokenizer/ of a download), else against the published models'
languages, so that a wrong name is caught before hours of encoding, not by the trainer after.
"""

import difflib
import json
from pathlib import Path

AUTO_LANGUAGE = "auto"  # no language id in the prefix (generate()'s default)

# talker_config.codec_language_id of the published Base models (0.6B and 1.7B alike).
PUBLISHED_LANGUAGE_IDS = {
    "chinese": 2055,
    "english": 2050,
    "german": 2053,
    "italian": 2070,
    "portuguese": 2071,
    "spanish": 2054,
    "japanese": 2058,
    "korean": 2064,
    "french": 2061,
    "russian": 2069,
}

# The ISO 639-1 codes people write for them ("en", "en-US", "pt_BR").
ISO_CODES = dict(zh="chinese", en="english", de="german", it="italian", pt="portuguese", es="spanish",
                 ja="japanese", ko="korean", fr="french", ru="russian")


def model_languages(codec_language_id: dict) -> list:
    """auto and a model's languages, lower-case; dialects are reached through their speakers only."""
    return [AUTO_LANGUAGE] + sorted(name.lower() for name in (codec_language_id or {}) if "dialect" not in name.lower())


# How alike a name must be to one of the model's to be taken for its misspelling: "englsh" is 0.92,
# "germna" 0.83, while other languages' names sit at 0.6-0.77 ("danish"/"spanish", "persian"/"russian").
TYPO_SIMILARITY = 0.8
# Other languages that a spelling check or an ISO prefix would take for one of the model's: Javanese is
# one letter from "japanese"; Cantonese (zh-yue, zh-HK) is no Mandarin, which "chinese" speaks.
NOT_TYPOS = {"javanese", "zh-yue", "zh-hk", "zh-mo"}


def language_problem(value, known: list):
    """None where `value` names one of `known` (any case, spaces around), else what is wrong, with the
    language it most likely means, or, for another language, that `auto` speaks it."""
    if not isinstance(value, str):
        return f"{value!r} is not a language name"
    name = value.strip().lower()
    if name in known:
        return None
    guess = ISO_CODES.get(name.replace("_", "-").split("-")[0]) or next(
        iter(difflib.get_close_matches(name, known, n=1, cutoff=TYPO_SIMILARITY)), None)
    if guess in known and name.replace("_", "-") not in NOT_TYPOS:
        return f"{value!r} is not one of {known}; did you mean {guess!r}?"
    if "dialect" in name:  # a CustomVoice model's sichuan_dialect: an id generate() uses for dialect speakers only
        return (f"{value!r} is not one of {known}: a dialect is spoken by a built-in dialect speaker (for chinese "
                f"and auto), and generate_custom_voice refuses it as a language; use {AUTO_LANGUAGE!r}")
    # Another language's id would teach the voice that language's accent: auto has none.
    return (f"{value!r} is not one of {known}; for a language the model has no id for, use {AUTO_LANGUAGE!r} "
            f"(no language id, as generate_custom_voice(language={AUTO_LANGUAGE!r}) speaks)")


def languages_of_tokenizer_folder(tokenizer_folder) -> list:
    """The languages of the model whose folder holds this speech tokenizer, else the published ones."""
    if tokenizer_folder is not None:
        config = Path(tokenizer_folder).parent / "config.json"
        try:
            codec_language_id = json.loads(config.read_text())["talker_config"]["codec_language_id"]
        except (OSError, ValueError, KeyError, TypeError):
            codec_language_id = None
        if codec_language_id:
            return model_languages(codec_language_id)
    return model_languages(PUBLISHED_LANGUAGE_IDS)
