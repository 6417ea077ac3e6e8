"""Build the FedBPT NVFlare job; run it in the simulator, or export it for a real deployment.

python job.py --config configs/tiny.yaml                  # offline smoke run in the simulator
python job.py --model_name roberta-large --task_name sst2  # the paper's setting (GPU, hub access)
python job.py --export --export-dir ./jobs                 # job folder for `nvflare job submit`
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SIMULATOR_POLL_SECONDS = 0.05  # NVFlare's default task_request_interval of 2 s would dominate short rounds
# Our messages are a few KB (at most 0.5 MB: a float32 covariance triangle at d=500). Chunk size 0 makes FOBS
# put numpy arrays inline instead of behind a separate download transaction: one round trip less per message.
INLINE_ARRAYS = {"np_download_chunk_size": 0}


def build_job(cfg: dict):
    """The FedJob: our controller and TensorBoard receiver on the server, our executor on every client."""
    from nvflare.app_opt.tracking.tb.tb_receiver import TBAnalyticsReceiver
    from nvflare.job_config.api import FedJob

    from fedbpt.checkpoint import attach_to_job
    from fedbpt.config import run_config
    from fedbpt.controller import FedBPTController
    from fedbpt.executor import TASK_EVAL, TASK_ROUND, TASK_SETUP, FedBPTExecutor

    run_cfg = run_config(cfg)
    job = FedJob(name=cfg["job_name"], min_clients=cfg["min_clients"])
    attach_to_job(job, cfg, run_cfg)
    job.to_server(FedBPTController(config=run_cfg), id="fedbpt_controller")
    job.to_server(TBAnalyticsReceiver(events=["analytix_log_stats"]), id="tb_receiver")
    job.to_server({"server": {"task_request_interval": SIMULATOR_POLL_SECONDS}})
    job.to_server(dict(INLINE_ARRAYS))
    job.to_clients(FedBPTExecutor(config=run_cfg), tasks=[TASK_SETUP, TASK_ROUND, TASK_EVAL])
    job.to_clients(dict(INLINE_ARRAYS))
    return job


def check_deployment_inputs(cfg: dict) -> None:
    """Checks that hold for the simulator and for an exported job: the checkpoint to resume, the fault plan."""
    from fedbpt.checkpoint import check_compatible, load
    from fedbpt.config import clients_per_round
    from fedbpt.fault import ENV, parse

    if cfg["resume"]:
        check_compatible(load(cfg["resume"]), cfg, min(clients_per_round(cfg), cfg["num_clients"]))
    parse(os.environ.get(ENV, ""))


def preflight(cfg: dict) -> None:
    """Fail fast, with one line, on what would otherwise fail inside every client process."""
    from fedbpt.client import resolve_model_path
    from fedbpt.data import load_split, site_data
    from fedbpt.scorer import check_model_source, label_token_ids
    from fedbpt.tasks import ConfigError, get_task
    from fedbpt.tiny import TINY_NAME

    check_deployment_inputs(cfg)
    task = get_task(cfg["task_name"])
    if task.name == "planted":  # synthetic: build its data and model once here, before the clients start
        from fedbpt.planted import ensure_bundle

        cfg["model_cache_dir"] = cfg["model_cache_dir"] or os.path.join(cfg["workspace"], "models")
        ensure_bundle(cfg, cfg["model_cache_dir"])
        return
    train = load_split(task, "train", cfg["data_dir"])
    # the k-shot sample and the split of every site (what site-1's would raise, all would)
    site_data(
        task,
        None,
        cfg["k_shot"],
        cfg["num_clients"],
        0,
        cfg["iid"],
        cfg["alpha_dir"],
        cfg["seed"],
        full_train=train,
        scheme=cfg["partition"],
    )
    load_split(task, task.test_split, cfg["data_dir"])
    if cfg["model_name"] == TINY_NAME:
        cfg["model_cache_dir"] = cfg["model_cache_dir"] or os.path.join(cfg["workspace"], "models")
        resolve_model_path(cfg, train.texts, cfg["model_cache_dir"])
        return
    from transformers import AutoTokenizer

    from fedbpt.config import scorer_options
    from fedbpt.models import model_kind, resolve_model

    name = resolve_model(cfg["model_name"])  # smollm2-135m: converted here once, before the clients start
    check_model_source(name)
    kind = model_kind(name)
    if kind == "causal" and task.causal is None:
        raise ConfigError(f"task {task.name} has no causal-LM template: use a masked LM, or add one in fedbpt/tasks.py")
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except OSError as exc:
        raise ConfigError(
            f"cannot load the tokenizer of '{name}' ({str(exc).splitlines()[0][:120]}): pass --model_name with a "
            f"local model directory, or --model_name tiny-random for an offline smoke run"
        ) from None
    words = task.causal.label_words if kind == "causal" else task.label_words
    label_token_ids(tok, words, scorer_options(cfg, kind)["label_encoding"])  # the clients would refuse the same


def collect_results(workspace: str) -> str | None:
    """Copy the server's summary, prompts and checkpoint to the workspace root; return the summary path."""
    from fedbpt.checkpoint import CHECKPOINT_FILE
    from fedbpt.summary import SUMMARY_FILE

    found = sorted(glob.glob(os.path.join(workspace, "server", "*", SUMMARY_FILE)), key=os.path.getmtime)
    if not found:
        return None
    run_dir = os.path.dirname(found[-1])
    for name in (SUMMARY_FILE, "prompt_best.npy", "prompt_final.npy", CHECKPOINT_FILE):
        if os.path.isfile(os.path.join(run_dir, name)):
            shutil.copy(os.path.join(run_dir, name), os.path.join(workspace, name))
    return os.path.join(workspace, SUMMARY_FILE)


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, os.path.join(HERE, "src"))
    from fedbpt.config import resolve
    from fedbpt.tasks import ConfigError

    try:
        cfg = resolve(argv)
        if cfg["export"]:
            check_deployment_inputs(cfg)
            job = build_job(cfg)
            job.export_job(cfg["export_dir"])
            print(f"exported job to {os.path.join(os.path.abspath(cfg['export_dir']), cfg['job_name'])}")
            if not cfg["round_timeout"]:
                print("note: --round_timeout 0: a site that hangs stalls its round; set it for deployments")
            return 0
        cfg["workspace"] = os.path.abspath(cfg["workspace"])
        if not cfg["torch_threads"]:
            cfg["torch_threads"] = max(1, (os.cpu_count() or 1) // cfg["threads"])
        preflight(cfg)
        job = build_job(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from fedbpt.summary import SUMMARY_FILE

    stale = os.path.join(cfg["workspace"], SUMMARY_FILE)
    if os.path.exists(stale):
        os.remove(stale)  # never leave an old run's summary looking like this run's result
    rc = job.simulator_run(
        cfg["workspace"], n_clients=cfg["num_clients"], threads=cfg["threads"], gpu=cfg["gpu"], log_config="concise"
    )
    summary = collect_results(cfg["workspace"])
    if summary is None:
        print(f"error: the run wrote no summary; see the logs under {cfg['workspace']}", file=sys.stderr)
        return rc or 1
    import json

    with open(summary) as f:
        record = json.load(f)
    status = record["status"]
    print(f"summary: {summary} ({status})")
    if status != "completed":
        from fedbpt.checkpoint import resume_hint

        reason = record.get("reason", "see the server log")
        print(f"error: the run stopped: {reason}{resume_hint(cfg)}", file=sys.stderr)
    return rc or (0 if status == "completed" else 1)


if __name__ == "__main__":
    sys.exit(main())
