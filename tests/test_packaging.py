"""pyproject.toml and environment.yml list the same packages; the README's commands exist."""
import re
import tomllib
from pathlib import Path



ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req.strip(), maxsplit=1)[0].lower()


def test_environment_yml_mirrors_pyproject():
    import yaml as _yaml

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(pyproject["dependencies"])
    for extra in ("notebooks", "dev"):
        wanted += pyproject["optional-dependencies"][extra]
    env = _yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    listed = [p for p in pip_section if not p.startswith("-e")]
    assert sorted(set(listed)) == sorted(set(wanted)), (
        "environment.yml's pip section must repeat pyproject.toml's requirements (with the same "
        f"version bounds):\n  only in yml: {sorted(set(listed) - set(wanted))}"
        f"\n  only in pyproject: {sorted(set(wanted) - set(listed))}")
    assert "-e ." in pip_section, "environment.yml must install the project itself"


def test_torch_and_deepspeed_are_lower_bounds_only():
    """Gaudi users keep the torch/DeepSpeed builds in Habana's container: never pin them exactly."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for d in deps:
        if _name(d) in ("torch", "deepspeed"):
            assert "==" not in d and "<" not in d, f"{d!r} would replace Habana's build"


def test_readme_opens_with_the_two_commands():
    head = (ROOT / "README.md").read_text().split("\n## ")[0]
    assert "make demo" in head and "make test" in head
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_import_is_light():
    """`import minimegatron` must not pull DeepSpeed, transformers or sentencepiece."""
    import subprocess
    import sys

    code = ("import sys, minimegatron, minimegatron.mpu; "
            "heavy = [m for m in ('deepspeed', 'transformers', 'sentencepiece') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_gaudi_stack_installs_the_same_light_dependencies():
    """`make install STACK=gaudi` installs the project --no-deps plus LIGHT_DEPS: pyproject's list
    without torch and DeepSpeed (which stay Habana's), extras included."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [d for d in pyproject["dependencies"] if _name(d) not in ("torch", "deepspeed")]
    for extra in ("notebooks", "dev"):
        wanted += pyproject["optional-dependencies"][extra]
    makefile = (ROOT / "Makefile").read_text()
    block = re.search(r"^LIGHT_DEPS = (.*?)(?<!\\)\n", makefile, re.M | re.S).group(1)
    listed = [w.strip('"') for w in block.replace("\\\n", " ").split()]
    assert sorted(set(listed)) == sorted(set(wanted)), (listed, wanted)
    assert "--no-deps" in makefile and "uninstall -q -y triton" in makefile


def test_ci_runs_both_stacks():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test STACK=gaudi" in ci and re.search(r"^make test$", ci, re.M)
