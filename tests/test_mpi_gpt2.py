"""GPT-2 + LoRA under the runtime (needs the llm extra): one FSL-SAGE round of the tiny model on an E2E fixture
runs on every rank, the alignment lowers every client's alignment loss, only LoRA weights travel, and the test
loss is per completion token."""
import math
import os

import numpy as np
import pytest
from conftest import on_root, run_job, write_on_root

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("tiktoken")

pytestmark = pytest.mark.mpi(min_size=4)


def test_one_fsl_sage_round_of_gpt2_tiny_aligns_and_counts_lora_only(shared_tmp):
    from mpisage.data.e2e import write_e2e_fixture
    from mpisage.runtime.transport import Kind
    root = os.path.join(shared_tmp, "e2e")
    write_on_root(write_e2e_fixture, root, 24, 8)
    run_dir = os.path.join(shared_tmp, "gpt2")
    run_job([f"dataset.root={root}", "dataset=e2e", "model=gpt2_tiny",
             "dataset.seq_len=32", "num_clients=2", "rounds=1", "batch_size=8", "optim.name=adamw", "optim.lr=1e-3",
             "lm.aux_blocks=1", "fsl.align_buffer_size=8", "fsl.align_steps=6", "fsl.align_lr=1e-3",
             "eval.batch_size=8",
             "eval.samples=8",
             f"run_dir={run_dir}"])

    def check():
        import torch

        from mpisage.config import LMConfig
        from mpisage.runtime.metrics import read_rounds
        from mpisage.models import build_split, state_bytes
        r = read_rounds(os.path.join(run_dir, "metrics.h5"))
        first, last = r["align_loss"][0, :, 0], r["align_loss"][0, :, 1]
        torch.manual_seed(0)
        split = build_split("gpt2_tiny", num_classes=50257, lm=LMConfig(aux_blocks=1), seq_len=32)
        return [r["test_loss"][0], *(last < first), r["paper_bytes_by_kind"][0, Kind.CLIENT_MODEL],
                state_bytes(split.client), sum(p.numel() * 4 for p in split.client.parameters())]

    test_loss, aligned_0, aligned_1, client_model_bytes, lora_bytes, all_client_bytes = on_root(check)
    assert math.isfinite(test_loss) and 0 < test_loss < 2 * np.log(50257)     # mean CE per scored token
    assert aligned_0 and aligned_1, "the alignment did not lower the alignment loss of every client"
    # each of 2 clients sends its client part up and gets the average back: LoRA weights only
    assert client_model_bytes == 2 * 2 * lora_bytes and lora_bytes < all_client_bytes / 10
