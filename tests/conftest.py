import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory):
    """The embedded demo corpus, built once per session."""
    from dedup2b import demo
    root = tmp_path_factory.mktemp("demo")
    shards = demo.build(root)
    return root, shards


@pytest.fixture(scope="session")
def ray_executor():
    """One real local Ray for the session (2 CPUs, small object store, bound to 127.0.0.1)."""
    from dedup2b.core.config import RayConfig
    from dedup2b.core.executor import RayExecutor
    ex = RayExecutor(RayConfig(num_cpus=2, object_store_mb=400))
    yield ex
    ex.shutdown()


def make_config(tmp_path, input_path, **sections):
    from dedup2b.core.config import from_dict
    data = {"input": {"path": str(input_path)}, "run_dir": str(tmp_path / "run")}
    data.update(sections)
    return from_dict(data)


def chromium_dom(page, profile, *extra) -> str:
    """Headless Debian chromium's DOM of a local page after its load handlers (skips the test
    where chromium is not installed)."""
    import shutil
    import subprocess
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("Debian's chromium is not installed (make test installs it where apt can)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
             "--virtual-time-budget=5000"]
    args = list(extra) or ["--dump-dom"]
    return subprocess.run([exe, *flags, *args, page.as_uri()], capture_output=True, text=True, timeout=120).stdout
