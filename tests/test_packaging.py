"""Bento builds (CPU and CUDA), the built Bento serving for real, compose and Kubernetes files.

No Docker engine runs on our machines: images are checked through the exact Dockerfile
`bentoml containerize` would build (`bentoml.container.get_containerfile`), not by building them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import yaml

from openstt.audio import decode_audio
from scripts.kit.realtime import frames, pcm24k
from scripts.kit.server import Server, free_port, server_env
from tests.conftest import FOX, clip

ROOT = Path(__file__).resolve().parent.parent
BENTOML = str(Path(sys.executable).with_name("bentoml"))
MANIFESTS = sorted(p for p in (ROOT / "deploy" / "k8s").rglob("*.yaml") if p.name != "kustomization.yaml")


@pytest.fixture(scope="module")
def bento_home(tmp_path_factory):
    return tmp_path_factory.mktemp("bentoml-home")


def build(bento_home: Path, bentofile: str) -> str:
    env = {**os.environ, "BENTOML_HOME": str(bento_home), "BENTOML_DO_NOT_TRACK": "true"}
    proc = subprocess.run([BENTOML, "build", "-f", bentofile, "-o", "tag", str(ROOT)], env=env, capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1].removeprefix("__tag__:")


def containerfile(bento_home: Path, tag: str, tmp_path: Path) -> str:
    script = ("import bentoml, sys; bentoml.container.get_containerfile(sys.argv[1], output_path=sys.argv[2])")
    out = tmp_path / f"{tag.replace(':', '_')}.dockerfile"
    env = {**os.environ, "BENTOML_HOME": str(bento_home), "BENTOML_DO_NOT_TRACK": "true"}
    subprocess.run([sys.executable, "-c", script, tag, str(out)], env=env, check=True, timeout=300)
    return out.read_text()


@pytest.fixture(scope="module")
def bentos(bento_home):
    return {"cpu": build(bento_home, "bentofile.yaml"), "cuda": build(bento_home, "bentofile.cuda.yaml")}


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["cpu", "cuda"])
def test_bento_build_and_containerfile(bentos, bento_home, tmp_path, variant):
    tag = bentos[variant]
    bento_dir = bento_home / "bentos" / tag.split(":")[0] / tag.split(":")[1]
    assert (bento_dir / "src" / "service.py").exists()
    assert (bento_dir / "src" / "openstt" / "engines" / "whisper_core.py").exists()
    assert not (bento_dir / "src" / "tests").exists()
    requirements = (bento_dir / "env" / "python" / "requirements.txt").read_text()
    assert "torch==2.13.0" in requirements and "bentoml==1.4.40" in requirements
    cpu_index = "--extra-index-url https://download.pytorch.org/whl/cpu"
    assert (cpu_index in requirements) == (variant == "cpu")  # CUDA: PyPI's torch wheels bundle CUDA
    dockerfile = containerfile(bento_home, tag, tmp_path)
    assert "FROM python:3.11-slim" in dockerfile
    assert "libsndfile1" in dockerfile
    for env in ("ENV BENTOML_PORT=$BENTOML_PORT", "ENV HF_HOME=$HF_HOME"):
        assert env in dockerfile
    assert "ARG BENTOML_PORT=8080" in dockerfile and "ARG HF_HOME=/home/bentoml/hf" in dockerfile
    # the HF cache directory is created (as root, before USER bentoml) so a volume over it is writable
    setup = dockerfile.index("./env/docker/script__")
    assert setup < dockerfile.index("USER bentoml")
    bento_yaml = yaml.safe_load((bento_dir / "bento.yaml").read_text())
    assert bento_yaml["labels"]["variant"] == variant


@pytest.mark.slow
def test_built_cpu_bento_serves(bentos, bento_home, hf_cache, tmp_path):
    """`bentoml serve <tag>` runs the Bento's own copy of the code, not this source tree."""
    port = free_port()
    env = server_env(hf_cache, tmp_path, OPEN_STT_MODELS="whisper-tiny.en")
    env["BENTOML_HOME"] = str(bento_home)
    srv = Server([BENTOML, "serve", bentos["cpu"], "--port", str(port)], env, port, tmp_path / "bento.log")
    try:
        client = openai.OpenAI(base_url=srv.base + "/v1", api_key="x", max_retries=0)
        text = client.audio.transcriptions.create(model="whisper-1", file=clip("en/quick_brown_fox")).text
        assert text == FOX
        import httpx

        assert httpx.get(srv.base + "/livez").status_code == 200  # the k8s liveness probe's path
        # live transcription: a WebSocket through the Bento's mounted app, a manual commit of real speech
        with client.realtime.connect(extra_query={"intent": "transcription"}) as live:
            assert live.recv().type == "session.created"
            live.session.update(session={"type": "transcription", "audio": {"input": {"turn_detection": None}}})
            assert live.recv().type == "session.updated"
            for frame in frames(pcm24k(decode_audio(clip("en/quick_brown_fox").read_bytes()))):
                live.input_audio_buffer.append(audio=frame)
            live.input_audio_buffer.commit()
            event = live.recv()
            while event.type != "conversation.item.input_audio_transcription.completed":
                event = live.recv()
            assert event.transcript == FOX
    finally:
        assert srv.stop() == 0
    assert str(ROOT / "openstt") not in srv.log.read_text()  # code ran from the Bento


def compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose not installed (scripts/setup installs Debian's when run as root)")
    full_env = {"PATH": os.environ["PATH"], **(env or {})}
    return subprocess.run([exe, "-f", str(ROOT / "docker-compose.yml"), *args], env=full_env, capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


@pytest.mark.parametrize("profile, service", [("default", "open-stt"), ("cuda", "open-stt-cuda")])
def test_compose_profiles_validate_and_interpolate(profile, service):
    env = {"OPEN_STT_PORT": "9123", "OPEN_STT_MODELS": "whisper-base", "OPEN_STT_API_KEY": "sk-compose"}
    proc = compose("--profile", profile, "config", env=env)
    assert proc.returncode == 0, proc.stderr
    config = yaml.safe_load(proc.stdout)
    svc = config["services"][service]
    # each variant only runs under its own profile, so `--profile cuda` never starts both on one port
    assert svc["profiles"] == [profile]
    assert svc["ports"][0]["published"] in (9123, "9123") and svc["ports"][0]["target"] == 8080
    assert svc["environment"]["OPEN_STT_MODELS"] == "whisper-base"
    assert svc["environment"]["OPEN_STT_API_KEY"] == "sk-compose"
    assert svc["restart"] == "unless-stopped" and svc["healthcheck"]["start_period"]
    assert svc["volumes"][0].startswith("hf_cache:/home/bentoml/hf")
    assert "hf_cache" in config["volumes"]
    if profile == "cuda":
        device = svc["deploy"]["resources"]["reservations"]["devices"][0]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


def test_compose_split_profile_wires_api_to_model_service():
    env = {"OPEN_STT_PORT": "9123", "OPEN_STT_MODELS": "whisper-base", "OPEN_STT_API_KEY": "sk-compose"}
    proc = compose("--profile", "split", "config", env=env)
    assert proc.returncode == 0, proc.stderr
    config = yaml.safe_load(proc.stdout)
    api, models = config["services"]["open-stt-api"], config["services"]["open-stt-models"]
    for svc, role in ((api, "api"), (models, "models")):
        assert svc["profiles"] == ["split"]  # never started by `up` alone nor next to the single-process profiles
        assert svc["image"] == "open-stt:cpu"
        assert svc["command"][:5] == ["python", "-m", "openstt.cli", "--role", role]
        assert svc["working_dir"] == "/home/bentoml/bento/src"  # where the Bento keeps openstt/
        # the same settings and cache for both roles: the API needs the models' tokenizer files
        assert svc["environment"]["OPEN_STT_MODELS"] == "whisper-base"
        assert svc["environment"]["OPEN_STT_API_KEY"] == "sk-compose"
        assert svc["volumes"][0].startswith("hf_cache:/home/bentoml/hf")
        assert svc["restart"] == "unless-stopped"
        # requests may run OPEN_STT_REQUEST_TIMEOUT (3600 s): the stop grace must cover one
        grace = svc["stop_grace_period"]
        assert grace.endswith("m") and int(grace[:-1]) * 60 >= int(svc["environment"]["OPEN_STT_REQUEST_TIMEOUT"])
    # the API's --model-service-url is the models service by its compose name, on the port it listens on
    url = api["command"][api["command"].index("--model-service-url") + 1]
    assert url == f"http://open-stt-models:{models['environment']['BENTOML_PORT']}"
    assert api["ports"][0]["published"] in (9123, "9123") and api["ports"][0]["target"] == 8080
    assert "ports" not in models  # pickled calls: reachable only over the compose network
    assert api["depends_on"] == {"open-stt-models": {"condition": "service_healthy"}}
    assert "/readyz" in models["healthcheck"]["test"][-1] and "/health'" in api["healthcheck"]["test"][-1]


def test_compose_defaults_without_env():
    proc = compose("--profile", "default", "config")
    assert proc.returncode == 0, proc.stderr
    svc = yaml.safe_load(proc.stdout)["services"]["open-stt"]
    assert svc["environment"]["OPEN_STT_MODELS"] == "whisper-tiny.en"
    assert svc["ports"][0]["published"] in (8080, "8080")


def test_compose_rejects_a_broken_file(tmp_path):
    broken = tmp_path / "docker-compose.yml"
    broken.write_text((ROOT / "docker-compose.yml").read_text().replace("restart: unless-stopped",
                                                                         "restart: [unless-stopped]"))
    exe = shutil.which("docker-compose") or pytest.skip("docker-compose not installed")
    proc = subprocess.run([exe, "-f", str(broken), "config"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0


@pytest.mark.parametrize("manifest", MANIFESTS, ids=[str(p.relative_to(ROOT)) for p in MANIFESTS])
def test_kubernetes_manifests_validate(manifest):
    """Built-in kinds; custom resources (KEDA's ScaledObject) and the kustomize builds of every overlay
    are validated in tests/test_deploy.py."""
    import kubernetes_validate

    docs = [doc for doc in yaml.safe_load_all(manifest.read_text()) if doc]
    assert docs, manifest
    for doc in docs:
        if doc["apiVersion"].startswith("keda.sh/"):  # a CRD's kind, unknown to kubernetes_validate
            continue
        kubernetes_validate.validate(doc, "1.31", strict=True)


def test_kubernetes_validation_can_fail():
    import kubernetes_validate

    doc = yaml.safe_load((ROOT / "deploy" / "k8s" / "cpu" / "deployment.yaml").read_text())
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {"path": "/health"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, "1.31", strict=True)


def test_kubernetes_probes_use_real_endpoints():
    doc = yaml.safe_load((ROOT / "deploy" / "k8s" / "cuda" / "deployment.yaml").read_text())
    container = doc["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["ports"][0]["containerPort"] == 8080


@pytest.mark.parametrize("bentofile", ["bentofile.yaml", "bentofile.cuda.yaml"])
def test_bentofiles_install_every_runtime_dependency(bentofile):
    """Both images get each of pyproject's dependencies with the same specifier (bentoml itself
    comes with the Bento), so a dependency added to one place cannot be missing from an image."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    packages = yaml.safe_load((ROOT / bentofile).read_text())["python"]["packages"]
    assert "torch==2.13.0" in packages
    missing = [dep for dep in project if not dep.startswith("bentoml") and dep not in packages]
    assert not missing, f"{bentofile} lacks {missing}"
