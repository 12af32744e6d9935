"""The two README commands: the demo runs the whole pipeline, and CI runs exactly the README's test command."""

import json
import os
import re
import subprocess

from helpers import ROOT

README = (ROOT / "README.md").read_text()


def readme_command(title: str) -> str:
    """The shell command in the README's code block right after a line containing `title`."""
    match = re.search(re.escape(title) + r".*?```(?:bash|sh)?\n(.*?)\n```", README, re.S)
    assert match, f"README has no command under {title!r}"
    return match.group(1).strip()


def test_ci_runs_exactly_the_readme_test_command():
    command = readme_command("Run the tests")
    assert command in (ROOT / ".ci" / "run").read_text()


def test_the_demo_runs_the_whole_pipeline(tmp_path):
    command = readme_command("Run the demo")
    assert command.endswith("./demo.sh")
    # The install half is what CI exercises; here the demo itself runs with this environment's Python.
    result = subprocess.run(["bash", "demo.sh"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, PYTHON=os.sys.executable, RUN=str(tmp_path / "demo")))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "demo passed" in result.stdout
    speech = tmp_path / "demo" / "speech"
    report = json.loads((speech / "report.json").read_text())
    # The fine-tuned model said the clips' four sentences, stopped on its own after each, and every
    # listening check passed.
    assert report["passed"] and report["failures"] == [] and report["checks"]["stop"] == "passed"
    sentences = (tmp_path / "demo" / "clips" / "sentences.txt").read_text().splitlines()
    assert [sentence["text"] for sentence in report["sentences"]] == sentences and len(sentences) == 4
    wavs = sorted(speech.glob("*.wav"))
    assert len(wavs) == 4 and all(w.stat().st_size > 1000 for w in wavs)
    assert (tmp_path / "demo" / "output" / "checkpoint-epoch-3" / "model.safetensors").is_file()


def test_ci_fails_when_no_test_ran(tmp_path):
    """pytest's "no tests collected" (exit 5) must fail CI, not pass it: a stand-in python3 makes a
    .venv whose pip succeeds and whose python exits 5."""
    (tmp_path / ".ci").mkdir()
    (tmp_path / ".ci" / "run").write_text((ROOT / ".ci" / "run").read_text())
    (tmp_path / "requirements.txt").write_text("")
    stand_in = tmp_path / "bin" / "python3"
    stand_in.parent.mkdir()
    stand_in.write_text('#!/usr/bin/env bash\n'  # called as: python3 -m venv .venv
                        'mkdir -p .venv/bin\n'
                        'printf "#!/usr/bin/env bash\\nexit 0\\n" > .venv/bin/pip\n'
                        'printf "#!/usr/bin/env bash\\nexit 5\\n" > .venv/bin/python\n'
                        'chmod +x .venv/bin/pip .venv/bin/python\n')
    stand_in.chmod(0o755)
    result = subprocess.run(["bash", str(tmp_path / ".ci" / "run")], capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, PATH=f"{stand_in.parent}{os.pathsep}{os.environ['PATH']}"))
    assert result.returncode != 0 and "no tests" in result.stderr

