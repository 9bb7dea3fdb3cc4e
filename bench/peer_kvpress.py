"""kvpress KVzipPress on the same examples (runs in the peers venv: transformers 5.2.0, kvpress 0.5.5).

Same weights as ctxc (the converted SmolLM2 directory, loaded in bf16 like ctxc), same token ids (from the file
`bench/bench_kvzip.py --examples-out` writes). Per example: plain prefill (timed, reference NLLs), then `with press(model): model.model(...)`
(timed: prefill + KVzip scoring), and the answer NLL after the question at every ratio. KVzip's scores do not depend
on the ratio, so the press runs once per example at the first ratio and the saved scores are re-selected by kvpress's
own `compress_post` for the other ratios. kvpress only masks (fake keys), nothing is removed from the cache.
`prefix_length` is set to the real template prefix of the cartridge prompt.

usage (see ../shared/peers/SETUP.md for the venv; MODEL_DIR: ctxc's converted SmolLM2 folder, e.g.
$CTXC_HOME/models/<name>):
  .venv/bin/python bench/bench_kvzip.py --examples-out /tmp/kv-examples.jsonl
  MODEL_DIR=... /tmp/ctxc-peers/venv/bin/python bench/peer_kvpress.py /tmp/kv-examples.jsonl /tmp/kvpress.jsonl
  .venv/bin/python bench/bench_kvzip.py --peer /tmp/kvpress.jsonl
"""
import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

MODEL_DIR = os.environ.get("MODEL_DIR", "")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("examples")
    ap.add_argument("out")
    ap.add_argument("--ratios", default="0.5,0.75,0.9")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from kvpress import KVzipPress
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.bfloat16).eval()
    ratios = [float(r) for r in args.ratios.split(",")]

    class Press(KVzipPress):
        """KVzipPress with the real template prefix and its scores kept for re-selection at other ratios."""

        def _perform_kvzip_compression(self, model, tokenizer):
            self.prefix_length = self.real_prefix
            super()._perform_kvzip_compression(model, tokenizer)

        def compress_post(self, model):
            self.saved_scores = self.score_val.clone()
            super().compress_post(model)

    def nll(cache, S, q, a):
        ids = q + a
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids]), past_key_values=cache,
                           position_ids=torch.arange(S, S + len(ids))[None]).logits[0].float()
        for layer in cache.layers:  # drop the question/answer entries again
            layer.keys, layer.values = layer.keys[..., :S, :], layer.values[..., :S, :]
        lp = torch.log_softmax(logits[len(q) - 1: len(ids) - 1], -1)
        return float(-lp.gather(1, torch.tensor(a)[:, None]).mean())

    done = set()
    if os.path.exists(args.out):
        done = {json.loads(x)["id"] for x in open(args.out) if x.strip()}
    for line in open(args.examples):
        ex = json.loads(line)
        if ex["id"] in done:
            continue
        ids, S = ex["ids"], len(ex["ids"])
        x = torch.tensor([ids])
        t = time.perf_counter()
        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            model.model(input_ids=x, past_key_values=cache)
        t_prefill = time.perf_counter() - t
        ref = nll(cache, S, ex["q_ids"], ex["a_ids"])
        del cache
        press = Press(compression_ratio=ratios[0])
        press.real_prefix = ex["n_prefix"]
        cache = DynamicCache(config=model.config)
        t = time.perf_counter()
        with torch.inference_mode(), press(model):
            model.model(input_ids=x, past_key_values=cache)
        t_press = time.perf_counter() - t
        row = {"id": ex["id"], "split": ex["split"], "source": ex["source"], "tokens": S,
               "prefill_s": round(t_prefill, 3), "press_build_s": round(t_press, 3), "ref_nll": ref}
        for r in ratios:
            if r != ratios[0]:
                press.compression_ratio = r
                press.score_val = press.saved_scores.clone()
                with torch.inference_mode():
                    press.compress_post(model)
            row[f"kvzip:{r}"] = nll(cache, S, ex["q_ids"], ex["a_ids"]) - ref
        for layer in model.model.layers:
            layer.self_attn.masked_key_indices = None
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
