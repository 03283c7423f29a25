"""The docs site: it builds with broken links failing, its generated reference pages are what the sources give,
the training contract names the registry's architectures and data sets, and every tutorial runs as shown."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shared.families import FAMILIES

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
# The tutorials, and the README's examples.
TUTORIALS = [*sorted(path for path in (DOCS / "tutorials").glob("*.md") if path.name != "index.md"), ROOT / "README.md"]


def test_the_reference_pages_are_what_the_sources_give():
    done = subprocess.run([sys.executable, str(DOCS / "generate.py"), "--check"], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_the_site_builds_with_broken_links_failing(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "site" / "reference" / "settings" / "index.html").exists()


def test_the_generated_pages_name_every_setting_rpc_and_command():
    settings = (DOCS / "reference" / "settings.md").read_text()
    rpcs = (DOCS / "reference" / "rpcs.md").read_text()
    assert "`MAAS_GNN_MAX_USERS_PER_CALL`" in settings and "`MAAS_GATEWAY_REDIS_URL`" in settings
    for family in FAMILIES:
        for method in (*family.queries, *family.updates):
            assert f"#### {family.service_name}.{method}" in rpcs, method
    assert "## maasctl recommend" in (DOCS / "reference" / "maasctl.md").read_text()


def _quoted_after(text: str, family: str) -> set[str]:
    """The quoted names a comment gives for `family` ("gnn: "gcn", "sage" ... ; nlp: ...")."""
    match = re.search(rf"\b{family}: (.*?)(?:;|\Z)", text, re.S)
    return set(re.findall(r'"([a-z0-9_-]+)"', match.group(1))) if match else set()


def test_the_training_contract_names_the_registrys_architectures_and_built_in_data_sets():
    proto = (ROOT / "protos" / "maas" / "training" / "v1" / "training.proto").read_text()
    request = proto[proto.index("message SubmitJobRequest") :]
    architecture = " ".join(line.strip().lstrip("/") for line in request.split("string architecture")[0].splitlines()
                            if line.strip().startswith("//"))  # fmt: skip
    datasets = " ".join(line.strip().lstrip("/") for line in
                        request.split("string builtin_dataset")[0].split("string dataset_id")[1].splitlines()
                        if line.strip().startswith("//"))  # fmt: skip
    for family in FAMILIES:
        assert _quoted_after(architecture, family.name) == set(family.architectures), family.name
        assert _quoted_after(datasets, family.name) == set(family.builtin_datasets), family.name


def blocks(page: Path) -> list[tuple[str, str]]:
    """(language, code) of each fenced block of a page, in order."""
    return re.findall(r"^```(\w+)\n(.*?)^```", page.read_text(), re.S | re.M)


@pytest.mark.parametrize("page", TUTORIALS, ids=[page.stem for page in TUTORIALS])
def test_every_tutorial_runs_as_shown(cluster, page):
    """The page's Python blocks run in order in one namespace, and its shell lines (curl, maasctl) each exit 0,
    against the test cluster: its ports replace localhost:50051 and 127.0.0.1:8080."""
    target, http = cluster.specs["gateway"].target, f"127.0.0.1:{cluster.ports.gateway_http}"
    namespace: dict = {"__name__": f"tutorial_{page.stem}"}
    env = {**os.environ, "MAAS_TARGET": target}
    env.pop("MAAS_API_KEY", None)
    ran = 0
    for language, code in blocks(page):
        if language == "python":
            with contextlib.redirect_stdout(io.StringIO()):
                exec(compile(code.replace("localhost:50051", target), f"{page.name}", "exec"), namespace)  # noqa: S102
            ran += 1
        elif language in ("bash", "sh"):
            for line in code.replace("\\\n", " ").splitlines():
                command = line.split("#")[0].strip()
                if not command.startswith(("curl ", "maasctl ")):
                    continue
                if command.startswith("curl") and shutil.which("curl") is None:
                    continue
                argv = [arg.replace("127.0.0.1:8080", http) for arg in shlex.split(command)]
                if argv[0] == "maasctl":
                    argv[0] = str(Path(sys.executable).parent / "maasctl")
                done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
                assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
                ran += 1
    assert ran, f"{page.name} has no example to run"
    with contextlib.suppress(KeyError, AttributeError):
        namespace["maas"].close()
