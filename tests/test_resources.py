"""Training workers holding every CPU must not starve Ray Data into a hang.

The job runs in its own process with a local cluster of exactly 2 logical CPUs and 2 training workers of
1 CPU each. If the pipeline needed CPU-holding Ray Data tasks while the workers hold every CPU, this
would hang, and the timeout turns the hang into a failure."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import fresh_python

REPO = Path(__file__).parents[1]


# A job's own processes must talk to its own cluster, never to another one on the same host.
OTHER_CLUSTER_SIGNS = (
    "Found multiple active Ray instances",
    "Failed to register placement group with cleaner",
)


def _text_train_job(demo_root, out, *overrides: str) -> list[str]:
    """A 1-epoch text training job on the shared demo data, as its own process would be started."""
    paths = demo_root["text"]
    return [
        sys.executable, "jobs/train.py", "tasks=[text]", f"output_root={out}", "text.train.epochs=1",
        *[f"text.data.{s}={paths[s]}" for s in ("train", "val", "test")], *overrides,
    ]  # fmt: skip


def test_training_workers_holding_every_cpu_end_the_job_in_one_line_not_a_hang(
    ray_cluster, demo_root, tmp_path
):
    """Ray Data feeds the fit while the workers hold their CPUs: a local cluster with none left over would
    wait forever. The job says so in one line before it trains (the timeout turns a hang into a failure).
    ``ray_cluster``: the test session's own Ray instance runs on this host meanwhile."""
    cmd = _text_train_job(
        demo_root,
        tmp_path,
        "cluster.local_num_cpus=2",
        "text.train.num_workers=2",
        "text.train.cpus_per_worker=1",
    )
    try:
        done = subprocess.run(
            cmd, cwd=REPO, capture_output=True, text=True, timeout=300, start_new_session=True
        )
    except subprocess.TimeoutExpired as err:
        raise AssertionError("the job hung with every CPU held by training workers") from err
    assert done.returncode == 2, (done.stdout + done.stderr)[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("dlbatch: error:")]
    assert errors == [
        "dlbatch: error: text: the training workers hold 2 of the cluster's 2 CPUs and Ray Data needs at least "
        "1 more to feed them; lower text.train.num_workers or text.train.cpus_per_worker, or raise "
        "cluster.local_num_cpus"
    ]
    assert "Traceback" not in done.stdout + done.stderr
    assert (
        "local Ray: 2 logical CPUs, dashboard at http://127.0.0.1:" in done.stderr
    )  # its own cluster, said once
    assert not (tmp_path / "ray_results").exists()  # nothing trained


@pytest.mark.parametrize("cpus", [1, 2])
def test_workers_use_as_many_torch_threads_as_cpus_assigned(ray_cluster, cpus):
    """A worker that imported torch before its CPU assignment (a cluster that preloads torch) keeps a
    pool sized to the machine; dlbatch's workers and actors resize it to the assignment."""
    from dlbatch.cluster import use_assigned_cpus

    @ray_cluster.remote(num_cpus=cpus)
    def threads() -> int:
        import torch

        torch.set_num_threads(4)  # what an earlier import left behind on a bigger machine
        return use_assigned_cpus()

    assert ray_cluster.get(threads.remote()) == cpus


BLOCK_OPENCENSUS = '''
import sys


class _Missing:
    """As if the package were not installed: a plain `pip install ray` without the [default] extra."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "opencensus":
            raise ModuleNotFoundError(f"No module named {name!r}")


sys.meta_path.insert(0, _Missing())
'''


def test_a_local_job_runs_without_the_dashboards_packages(ray_cluster, demo_root, tmp_path):
    """ray.init(include_dashboard=True) does not start when the dashboard's packages are missing (here the
    job hung until this test's timeout); a job that asks for it says so in one line and runs without it."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCK_OPENCENSUS)
    cmd = _text_train_job(
        # Batches of 16: enough steps in one epoch for a model above the quality floor (else exit 3).
        demo_root,
        tmp_path / "out",
        "text.train.num_workers=1",
        "text.train.batch_size=16",
        "cluster.local_dashboard=true",
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    done = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=300, start_new_session=True, env=env
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "[text] test accuracy" in done.stdout
    [line] = [line for line in out.splitlines() if "dashboard cannot start" in line]
    assert "No module named 'opencensus'" in line and "ray[default]" in line
    assert "Traceback" not in out


LOCAL_DASHBOARD = """
import json, logging, subprocess, sys, urllib.request
from pathlib import Path
import psutil, ray
from dlbatch.cluster import ensure_ray
from dlbatch.config import load_config

logged = []
handler = logging.Handler()
handler.emit = lambda record: logged.append(record.getMessage())
logging.getLogger("dlbatch").addHandler(handler)
logging.getLogger("dlbatch").setLevel(logging.INFO)


def dashboard_hosts():  # --host= of Ray's dashboard processes under this one (some may exit meanwhile)
    hosts = []
    for proc in psutil.Process().children(recursive=True):
        try:
            args = proc.cmdline()
        except psutil.Error:
            continue
        if any("dashboard/dashboard.py" in arg for arg in args):
            hosts += [arg for arg in args if arg.startswith("--host=")]
    return hosts


def get(url, headers):
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10).status
    except urllib.error.HTTPError as err:
        return err.code


# The cluster's token as `ray get-auth-token` prints it, sent as Ray's token authentication documents.
ray_cli = str(Path(sys.executable).with_name("ray"))
token = subprocess.run([ray_cli, "get-auth-token"], capture_output=True, text=True, check=True).stdout.strip()
with_token = {"Authorization": f"Bearer {token}"}
seen = {}
for name, overrides in (("default", []), ("off", ["cluster.local_dashboard=false"])):
    ensure_ray(load_config(None, overrides))
    url = ray.init(ignore_reinit_error=True).dashboard_url  # the running cluster's context
    seen[name] = {
        "log": logged[-1],
        "url": url,
        "hosts": dashboard_hosts(),
        "status": url and {"anyone": get(f"http://{url}/api/version", {}),
                           "token": get(f"http://{url}/api/version", with_token)},
    }
    ray.shutdown()
print(json.dumps(seen))
"""


def test_a_local_cluster_serves_its_dashboard_only_when_asked_on_loopback_with_the_token(ray_cluster):
    """A local run serves Ray's dashboard (Ray Train's placement-group cleaner asks its state API) on
    127.0.0.1 only, to requests that carry the cluster's token, and logs where;
    ``cluster.local_dashboard=false`` starts none."""
    seen = json.loads(fresh_python(LOCAL_DASHBOARD))
    asked, off = seen["default"], seen["off"]
    assert off["url"] == "" and "no dashboard (cluster.local_dashboard=true" in off["log"], off
    assert asked["url"].startswith("127.0.0.1:"), asked
    assert asked["log"].endswith(f"dashboard at http://{asked['url']}"), asked
    assert asked["hosts"] == ["--host=127.0.0.1"], asked
    assert asked["status"] == {"anyone": 401, "token": 200}, asked
