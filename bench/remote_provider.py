"""The large model behind `fedpt-app serve-logits` (another process, loopback) vs loaded in this process: proxy
decoding tokens/s, the teacher cache's build time, and the bytes on the wire, measured side by side in one run.

    python bench/remote_provider.py [--run DIR] [--new-tokens 32] [--batch-sizes 1,8] [--repeats 3] [--top-k 20]
                                    [--threads 1] [--cache-examples N] [--transports http,websocket]

--run takes a finished FedPT run's small model, large model and adapter (default: the preset's models with a
random adapter). --threads: torch threads of this process and of the service each (default 1, as if each had
cores of its own: on a 2-core machine two processes of 2 spinning threads starve each other). --transports: how
the remote provider's session calls travel, each measured beside the local provider (HTTP requests, or messages on
the service's /v1/stream WebSocket, the default). Targets: remote decoding >= 0.8 x local at batch 1 and 8.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch
from peft import PeftModel

from fedpt_app.instruct.data import load_splits, load_test_rows
from fedpt_app.instruct.decoding import DecodingConfig, decode
from fedpt_app.instruct.distill import TeacherCache
from fedpt_app.instruct.prompts import build_prompt, tokenize_rows
from fedpt_app.instruct.proxy import LocalLogitsProvider, proxy_step, shared_vocab_size
from fedpt_app.models.loading import load_causal_lm, load_tokenizer
from fedpt_app.models.lora import LoraSpec, adapter_state, load_adapter_state, lora_model
from fedpt_app.serving.background import service_process
from fedpt_app.serving.remote import RemoteLogitsProvider, RemoteModelError
from fedpt_app.tools.simulation import validate_overrides

PORT = 18765


def tuned_small(args, config):
    """(small with its adapter, small ref, large ref): a finished run's, or the preset's with a random adapter."""
    if args.run:
        summary = json.loads((Path(args.run) / "summary.json").read_text())
        small = PeftModel.from_pretrained(load_causal_lm(summary["small_model"]), summary["adapter_dir"])
        return small, summary["small_model"], summary["large_model"]
    instruct = config.instruct
    small = lora_model(instruct.small_model, LoraSpec.from_settings(config.lora), seed=config.seed)
    generator = torch.Generator().manual_seed(0)
    load_adapter_state(
        small, {k: 0.05 * torch.randn(v.shape, generator=generator) for k, v in adapter_state(small).items()}
    )
    return small, instruct.small_model, instruct.large_model


def round_trip_ms(url: str, count: int = 200) -> float:
    with httpx.Client(base_url=url) as client:
        client.get("/healthz")
        began = time.perf_counter()
        for _ in range(count):
            client.get("/healthz")
    return (time.perf_counter() - began) / count * 1000


def refused_call_ms(remote: RemoteLogitsProvider, count: int = 200) -> float:
    """A session call the service refuses (an unknown session: no forward), so only the transport is timed."""
    began = time.perf_counter()
    for _ in range(count):
        with contextlib.suppress(RemoteModelError):
            remote._session_call("extend", "no-such-session", {"input_ids": [[0]]})
    return (time.perf_counter() - began) / count * 1000


def wire_bytes(provider) -> int:
    return getattr(provider, "bytes_sent", 0) + getattr(provider, "bytes_received", 0)


def bench_decoding(args, small, tokenizer, local, remotes, prompts_pool) -> None:
    decoding = DecodingConfig(max_new_tokens=args.new_tokens, stop_strings=(), ignore_eos=True)
    print(f"\ndecoding ({args.new_tokens} new tokens, greedy, EOS ignored; median of {args.repeats} interleaved runs)")
    print(f"{'batch':>6}{'provider':>20}{'tok/s':>9}{'x local':>9}{'bytes/token':>13}{'same output':>13}")
    providers = {"local": local} | {f"remote ({name})": remote for name, remote in remotes.items()}
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        prompts = prompts_pool[:batch_size]
        for remote in remotes.values():  # warm-up
            decode(proxy_step(remote, small, 1.0), tokenizer, prompts, DecodingConfig(max_new_tokens=2))
        rates: dict[str, list[float]] = {name: [] for name in providers}
        outputs, sent = {}, {}
        for _ in range(args.repeats):
            for name, provider in providers.items():
                before = wire_bytes(provider)
                began = time.perf_counter()
                outputs[name] = decode(proxy_step(provider, small, 1.0), tokenizer, prompts, decoding)
                rates[name].append(batch_size * args.new_tokens / (time.perf_counter() - began))
                sent[name] = wire_bytes(provider) - before
        for name in providers:
            rate = statistics.median(rates[name])
            print(
                f"{batch_size:>6}{name:>20}{rate:>9.1f}{rate / statistics.median(rates['local']):>9.2f}"
                f"{sent[name] / (batch_size * args.new_tokens):>13,.0f}{str(outputs[name] == outputs['local']):>13}"
            )


def bench_teacher_cache(args, config, small, tokenizer, local, remote) -> None:
    rows = load_splits(config.data.dataset, config.data.test_fraction, config.seed)["server"]
    rows = rows[: args.cache_examples] if args.cache_examples > 0 else rows
    examples, _ = tokenize_rows(tokenizer, rows, config.training.max_length, config.training.max_length // 2)
    pad, directory = tokenizer.pad_token_id, Path(tempfile.mkdtemp())
    variants = {"local": (local, 0), "remote": (remote, 0), f"remote, top-{args.top_k}": (remote, args.top_k)}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    sizes, wire = {}, {}
    for _ in range(args.repeats):  # interleaved, so machine noise hits every variant alike
        for name, (provider, top_k) in variants.items():
            before = wire_bytes(remote)
            began = time.perf_counter()
            cache = TeacherCache(examples, provider, small, 1.0, pad, "memory", 1e6, directory, top_k=top_k)
            seconds[name].append(time.perf_counter() - began)
            sizes[name], positions = cache.nbytes, int(cache.offsets[-1])
            wire[name] = (wire_bytes(remote) - before) / positions if provider is remote else 0
    print(f"\nteacher cache over the server split ({len(examples)} examples, {positions} positions)")
    print(f"{'large model':<24}{'seconds':>9}{'x local':>9}{'cache MB':>10}{'wire bytes/position':>21}")
    for name in variants:
        median = statistics.median(seconds[name])
        ratio = median / statistics.median(seconds["local"])
        print(f"{name:<24}{median:>9.2f}{ratio:>9.2f}{sizes[name] / 2**20:>10.2f}{wire[name]:>21,.0f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-config", default="")
    parser.add_argument("--run", default="", help="a finished FedPT run's output-dir")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--transports", default="http,websocket", help="how the remote provider's sessions travel")
    parser.add_argument(
        "--cache-examples", type=int, default=0, help="server-split rows for the teacher cache (0: all)"
    )
    args = parser.parse_args()
    transports = args.transports.split(",")
    torch.set_num_threads(args.threads)
    config = validate_overrides(args.run_config)
    small, small_ref, large_ref = tuned_small(args, config)
    small.eval()
    tokenizer = load_tokenizer(small_ref)
    local = LocalLogitsProvider(large_ref, shared_vocab_size(small_ref, large_ref))
    with tempfile.TemporaryDirectory() as folder:
        token = os.urandom(16).hex()
        (Path(folder) / "token").write_text(token)
        command = ["fedpt-app", "serve-logits", "--model", large_ref, "--port", str(PORT)]
        command += ["--token-file", str(Path(folder) / "token")]
        environment = os.environ | {"OMP_NUM_THREADS": str(args.threads)}
        with service_process(command, f"http://127.0.0.1:{PORT}", ready_path="/healthz", env=environment) as url:
            remotes = {name: RemoteLogitsProvider(url, tokenizer, token=token, transport=name) for name in transports}
            print(
                f"pair {small_ref} / {large_ref} (vocabulary {local.vocab_size}), {args.threads} torch thread(s) "
                "here and in the service"
            )
            rows = load_test_rows(config.data.dataset, config.data.test_dataset, config.data.test_fraction, config.seed)
            prompts = [build_prompt(row["instruction"], row.get("context", "")) for row in rows]
            print(f"an empty request (GET /healthz) takes {round_trip_ms(url):.2f} ms on loopback")
            for name, remote in remotes.items():
                print(f"a refused session call (no forward) over {name}: {refused_call_ms(remote):.2f} ms")
            bench_decoding(args, small, tokenizer, local, remotes, prompts)
            bench_teacher_cache(args, config, small, tokenizer, local, next(iter(remotes.values())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
