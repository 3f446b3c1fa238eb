"""CI keeps at most one virtualenv on disk (.ci/run).

Each virtualenv holds a CUDA build of torch (about 5 GB), and a CI run once stopped with "No
space left on device" while installing its second. These read .ci/run itself, since running
it takes most of an hour: every virtualenv a phase creates must be removed when that phase is
done, and torch.compile's cache must live in the work directory that the run removes.
"""
import pathlib
import re

CI_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / ".ci" / "run"


def _functions(text):
    """name -> body of each `name() { ... }` function of the script (bodies end at a `}` line)."""
    return dict(re.findall(r"^(\w+)\(\) \{\n(.*?)^\}", text, flags=re.S | re.M))


def test_every_phase_removes_the_virtualenv_it_made():
    functions = _functions(CI_SCRIPT.read_text())
    made = {}
    for name, body in functions.items():
        for venv in re.findall(r'MISS_OTHER_VENV="([^"]+)"', body):
            made[name] = venv
    assert made, "no phase of .ci/run passes MISS_OTHER_VENV: has the script changed shape?"
    for name, venv in made.items():
        if name == "run_tests_minimal_install":
            continue  # the last phase: the exit trap removes the whole work directory
        body = functions[name]
        assert re.search(r"free_disk [^\n]*" + re.escape(f'"{venv}"'), body), (
            f".ci/run: {name} makes the virtualenv {venv} and leaves it on disk")
    assert re.search(r'free_disk [^\n]*"\$venv"', functions["run_tests"]), (
        ".ci/run: run_tests leaves the main virtualenv on disk for the phases after it")


def test_free_disk_keeps_a_given_work_directory():
    body = _functions(CI_SCRIPT.read_text())["free_disk"]
    assert 'if [ -n "$temp_work" ]' in body, "free_disk must remove nothing of a CI_WORK given to reuse"


def test_compile_cache_lives_in_the_work_directory():
    text = CI_SCRIPT.read_text()
    assert re.search(r'^export TORCHINDUCTOR_CACHE_DIR="\$work/', text, flags=re.M), (
        ".ci/run: torch.compile's cache must be under $work, which the run removes")
