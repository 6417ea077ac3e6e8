"""Build the FedBPT NVFlare job; run it in the simulator, or export it for a real deployment.

python job.py --config configs/tiny.yaml                  # offline smoke run in the simulator
python job.py --model_name roberta-large --task_name sst2  # the paper's setting (GPU, hub access)
python job.py --export --export-dir ./jobs                 # job folder for `nvflare job submit`
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def protected_folders() -> dict[str, str]:
    """Folders a workspace may not be, nor contain: the simulator wipes its workspace."""
    return {
        "the current directory": os.getcwd(),
        "the project checkout": HERE,
        "the home directory": os.path.expanduser("~"),
    }


SIMULATOR_POLL_SECONDS = 0.05  # NVFlare's default task_request_interval of 2 s would dominate short rounds
# Our messages are a few KB (at most 0.5 MB: a float32 covariance triangle at d=500). Chunk size 0 makes FOBS
# put numpy arrays inline instead of behind a separate download transaction: one round trip less per message.
INLINE_ARRAYS = {"np_download_chunk_size": 0}


def build_job(cfg: dict, simulator: bool = False):
    """The FedJob: our controller and TensorBoard receiver on the server, our executor on every client.

    ``simulator``: clients poll the server every 0.05 s, for the simulator only; a deployed job keeps NVFlare's
    default polling (20 requests a second from every site would load a real server for nothing)."""
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
    if simulator:
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


def check_export_dir(path: str) -> None:
    """--export-dir must be a folder or creatable as one (NVFlare replaces only a job folder it made itself)."""
    from fedbpt.tasks import ConfigError

    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--export-dir {path} is a file: pass a folder (it is created if missing)")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--export-dir {path} cannot be created ({parent} is not a writable folder)")


def preflight(cfg: dict) -> None:
    """Fail fast, with one line, on what would otherwise fail inside every client process."""
    from transformers import AutoConfig, AutoTokenizer

    from fedbpt.client import resolve_model_path
    from fedbpt.config import check_machine, scorer_options
    from fedbpt.data import load_split, site_data
    from fedbpt.models import check_model_folder, model_kind, resolve_model
    from fedbpt.scorer import check_model_source, label_token_ids
    from fedbpt.tasks import ConfigError, get_task
    from fedbpt.tiny import TINY_NAME

    check_deployment_inputs(cfg)
    check_machine(cfg)
    task = get_task(cfg["task_name"])
    if task.name == "planted":  # synthetic: build its data and model once here, before the clients start
        from fedbpt.planted import ensure_bundle

        cfg["model_cache_dir"] = cfg["model_cache_dir"] or os.path.join(cfg["workspace"], "models")
        ensure_bundle(cfg, cfg["model_cache_dir"])
        return
    train = load_split(task, "train", cfg["data_dir"])
    # the k-shot sample and the split of every site (what site-1's would raise, all would)
    site1 = site_data(
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
    test = load_split(task, task.test_split, cfg["data_dir"])
    if cfg["model_name"] == TINY_NAME:
        cfg["model_cache_dir"] = cfg["model_cache_dir"] or os.path.join(cfg["workspace"], "models")
        name = resolve_model_path(cfg, train.texts, cfg["model_cache_dir"])
    else:
        name = resolve_model(cfg["model_name"])  # smollm2-135m: converted here once, before the clients start
        check_model_source(name)
        check_model_folder(name)
    kind = model_kind(name)
    if kind == "causal" and task.causal is None:
        raise ConfigError(f"task {task.name} has no causal-LM template: use a masked LM, or add one in fedbpt/tasks.py")
    try:
        tok = AutoTokenizer.from_pretrained(name)
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot load the tokenizer of '{name}' ({str(exc).splitlines()[0][:120]}): pass --model_name with a "
            f"local model directory, or --model_name tiny-random for an offline smoke run"
        ) from None
    words = task.causal.label_words if kind == "causal" else task.label_words
    label_token_ids(tok, words, scorer_options(cfg, kind)["label_encoding"])  # the clients would refuse the same
    check_fitting(cfg, task, tok, config, kind, {"train": site1.train, "test": test})


def check_fitting(cfg: dict, task, tok, config, kind: str, sets: dict) -> None:
    """Refuse a run whose every training or test example the scorer would drop as too long."""
    from fedbpt import causal, scorer
    from fedbpt.tasks import ConfigError

    n = cfg["n_prompt_tokens"]
    for split, examples in sets.items():
        if kind == "causal":
            kept = causal.count_fitting(tok, config, task, examples, n)
            limit = causal.max_length(config)
        else:
            kept, limit = scorer.count_fitting(tok, task, examples, n), scorer.MAX_SEQ_LEN
        if len(examples) and not kept:
            raise ConfigError(
                f"every {split} example of site-1 is longer than the model's {limit} positions with a {n}-token "
                f"prompt: lower --n_prompt_tokens, or use shorter texts"
            )


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, os.path.join(HERE, "src"))
    from fedbpt.config import resolve
    from fedbpt.tasks import ConfigError

    try:
        cfg = resolve(argv)
        if cfg["export"]:
            check_deployment_inputs(cfg)
            check_export_dir(cfg["export_dir"])
            job = build_job(cfg)
            try:
                job.export_job(cfg["export_dir"])
            except (RuntimeError, OSError) as exc:  # e.g. a folder of that name that is not this job's
                raise ConfigError(f"cannot export to {cfg['export_dir']}: {str(exc).splitlines()[0][:200]}") from None
            print(f"exported job to {os.path.join(os.path.abspath(cfg['export_dir']), cfg['job_name'])}")
            if not cfg["round_timeout"]:
                print("note: --round_timeout 0: a site that hangs stalls its round; set it for deployments")
            return 0
        from fedbpt import workspace

        workspace.check(cfg["workspace"], protected_folders())
        cfg["workspace"] = os.path.abspath(os.path.expanduser(cfg["workspace"]))
        if not cfg["torch_threads"]:
            cfg["torch_threads"] = max(1, (os.cpu_count() or 1) // cfg["threads"])
        preflight(cfg)
        cfg["resume"], notes = workspace.prepare(cfg["workspace"], cfg["resume"])
        job = build_job(cfg, simulator=True)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted before the run started; nothing was run", file=sys.stderr)
        return 130
    for note in notes:
        print(note)
    from fedbpt import simulate

    rc, record = simulate.run(job, cfg, sys.argv[1:] if argv is None else list(argv))
    print(f"summary: {os.path.join(cfg['workspace'], 'fedbpt_summary.json')} ({record['status']})")
    if record["status"] != "completed":
        hint = f"; continue with: {record['resume']}" if record.get("resume") else " (no checkpoint to resume from)"
        print(f"error: the run stopped: {record.get('reason', 'see the server log')}{hint}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
