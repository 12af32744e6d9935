"""The recipe (README_CHATTERBOX_STYLE.md) and README.md say what the code does: every flag of the three
commands is documented, a default the recipe states is the command's own, the reject reasons and flags
of prepare_codes.py are listed as the code names them, and every module is in README.md's table."""

import argparse
import re

import infer_test
import prepare_codes
import sft_12hz_chatterbox
from helpers import ROOT
from qwen3_tts_sft.dataset_layouts import FLAGS, REJECT_REASONS

RECIPE = (ROOT / "README_CHATTERBOX_STYLE.md").read_text()
# The recipe's sections and the command each documents.
SECTIONS = {"## 1. Recordings to codes": prepare_codes.build_parser, "## 2. Train": sft_12hz_chatterbox.build_parser,
            "## 3. Listen and check": infer_test.build_parser}


def section(title: str) -> str:
    start = RECIPE.index(title + "\n")
    end = RECIPE.find("\n## ", start + len(title))
    return RECIPE[start:end if end > 0 else None]


def named(text: str) -> set:
    """The plain names in backticks (`silent`, not `--silent` or `{...}`)."""
    return set(re.findall(r"`([a-z_]+)`", text))


def options(parser: argparse.ArgumentParser) -> dict:
    """--name -> its action, for every flag but --help (each under its first name, not its aliases)."""
    return {action.option_strings[0]: action for action in parser._actions
            if action.option_strings and action.option_strings[0] != "-h"}


def test_the_reject_reasons_and_flags_are_listed_as_the_code_names_them():
    reasons = RECIPE[RECIPE.index("Reasons: `"):RECIPE.index("The first 20 rejects")]
    assert named(reasons) == set(REJECT_REASONS)
    flagged = RECIPE[RECIPE.index("Flagged, kept, and named in the row's `flags`"):RECIPE.index("#### Reference clips")]
    assert named(flagged) - {"flags"} == set(FLAGS)


def test_every_flag_of_the_three_commands_is_in_its_section():
    for title, build in SECTIONS.items():
        text = section(title)
        missing = [name for name in options(build()) if not re.search(re.escape(name) + r"\b", text)]
        assert not missing, f"{title}: {missing} are not documented"


def stated_defaults(text: str):
    """(flag, value) for each default the text states as a number or on/off: a table row
    `| `--flag` | value |` or a flag followed by its value in brackets, `--flag` (value...)."""
    for name, value in re.findall(r"^\| `(--\w+)`(?: [A-Z]+)? \| ([^|]+?) \|", text, re.M):
        yield name, value.strip()
    for name, value in re.findall(r"`(--\w+)` \((-?[\d.]+)[):, ]", text):
        yield name, value


def same_default(stated: str, default) -> bool:
    if isinstance(default, bool):  # on or off; or a phrase, as for a --no_ switch ("grouped")
        return stated not in ("on", "off") or stated == ("on" if default else "off")
    if isinstance(default, (int, float)):
        try:
            return float(stated) == default
        except ValueError:
            return True  # a phrase ("with each eval", "4 x 2 = 8 clips a step"): not a plain value
    return stated == default or not re.fullmatch(r"[a-z_0-9]+", stated)


def test_every_default_the_recipe_states_is_the_commands_own():
    wrong = []
    for title, build in SECTIONS.items():
        flags = options(build())
        for name, stated in stated_defaults(section(title)):
            action = flags.get(name)
            if action is not None and action.default is not None and not same_default(stated, action.default):
                wrong.append(f"{title}: {name} says {stated!r}, the command's default is {action.default!r}")
    assert not wrong, "\n".join(wrong)


def test_every_flag_with_a_default_says_it_in_help():
    """The recipe says the trainer's `--help` lists every flag with its default; infer_test.py's shows
    each default that is a value (0 included), not what an unset flag or a switch does."""
    for build in (sft_12hz_chatterbox.build_parser, infer_test.build_parser):
        parser = build()
        formatter = parser._get_formatter()
        for name, action in options(parser).items():
            shown = formatter._expand_help(action) if action.help else ""
            unstated = action.required or (build is infer_test.build_parser
                                           and (action.default is None or action.default is False))
            assert "default" in shown or unstated, f"{name}: its help does not say its default"


def test_every_module_is_in_the_readme_file_table():
    readme = (ROOT / "README.md").read_text()
    modules = [path.name for path in (ROOT / "qwen3_tts_sft").glob("*.py") if path.name != "__init__.py"]
    assert [name for name in modules if f"`{name}`" not in readme and f"`qwen3_tts_sft/{name}`" not in readme] == []


def test_every_flag_a_resume_must_keep_is_named_where_resuming_is_explained():
    from qwen3_tts_sft import training_setup

    kept = (training_setup.DATA_ORDER_FLAGS + training_setup.STATE_FLAGS + training_setup.UPDATE_FLAGS
            + training_setup.TRAINED_WEIGHTS_FLAGS + training_setup.SCHEDULE_FLAGS
            + tuple(training_setup.EVAL_DATA_FLAGS))
    long_runs = RECIPE[RECIPE.index("### Long runs"):RECIPE.index("### Add voices")]
    assert [name for name in kept if f"`--{name}`" not in long_runs] == []
