"""Peak memory in a stage's row is that stage's own: not the batch-size probe's largest (failed) trial,
nor an earlier benchmark mode's, nor anything else this process allocated before the stage's steps."""
from pathlib import Path

import pytest
import torch

from nanochat.device import peak_memory_bytes, reset_peak_memory
from nanochat.distributed import DistInfo
from nanochat.gpt import GPTConfig, build_model

GB = 1 << 30
linux_peak = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc/self/clear_refs")


def _allocate_and_free(device, nbytes=GB):
    """What a probe's largest trial does: take a lot of memory (touched, so it is resident), then free it."""
    big = torch.ones(nbytes // 4, device=device)
    float(big[-1])
    del big


@linux_peak
def test_reset_starts_a_new_peak_on_cpu():
    cpu = torch.device("cpu")
    _allocate_and_free(cpu)
    high = peak_memory_bytes(cpu)
    reset_peak_memory(cpu)
    assert peak_memory_bytes(cpu) < high - GB // 2


def _sft_row(device):
    from nanochat.recipes.sft import SFTConfig, render_examples
    from nanochat.training.sft_loop import train
    from nanochat.synthetic import generate_conversations
    from nanochat.tokenizer import Tokenizer
    convs = generate_conversations(24, seed=1, max_tokens=64)
    tok = Tokenizer.byte_level()          # the CUDA twin runs where there is no rustbpe
    model = build_model(GPTConfig.from_depth(1, tok.get_vocab_size(), 64), device)
    cfg = SFTConfig(mode="eager-dynamic", seq_len=64, device_batch_size=2, max_steps=2, save_checkpoint=False,
                    val_conversations=0)
    return train(cfg, model, tok, render_examples(convs, tok, 64, "test"), [], 2, "config")


@linux_peak
def test_sft_row_peak_excludes_what_came_before():
    cpu = torch.device("cpu")
    _allocate_and_free(cpu)
    high = peak_memory_bytes(cpu)
    row = _sft_row(cpu)
    assert row["peak_memory_bytes"] < high - GB // 2, (row["peak_memory_bytes"], high)


@linux_peak
def test_train_loop_row_peak_excludes_what_came_before(tmp_path):
    from nanochat.dataloader import pretraining_loader
    from nanochat.dataset import split_shards
    from nanochat.prepare import ensure_pretraining_data, ensure_tokenizer, tokenizer_dir
    from nanochat.training.config import TrainConfig
    from nanochat.training.train_loop import train
    data = ensure_pretraining_data(tmp_path, num_shards=2, max_chars=100_000, row_group_size=16)
    tok = ensure_tokenizer(tmp_path, 300, data_path=data)
    train_shards, val_shard = split_shards(data)
    model = build_model(GPTConfig.from_depth(1, 300, 32))
    cpu = torch.device("cpu")
    _allocate_and_free(cpu)
    high = peak_memory_bytes(cpu)
    row = train(TrainConfig(seq_len=32, device_batch_size=2, num_steps=2, eval_tokens=64), stage="test", model=model,
                tokenizer=tok, tokenizer_dir=str(tokenizer_dir(tmp_path, 300, data)),
                dist_info=DistInfo(False, 0, 0, 1, cpu),
                make_train_loader=lambda r, w, n: pretraining_loader(train_shards, tok, 32, r, w, n),
                make_val_loader=lambda r, w, n: pretraining_loader([val_shard], tok, 32, r, w, n))
    assert row["peak_memory_bytes"] < high - GB // 2, (row["peak_memory_bytes"], high)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sft_row_peak_excludes_what_came_before_on_cuda():
    cuda = torch.device("cuda")
    _allocate_and_free(cuda, 4 * GB)
    assert peak_memory_bytes(cuda) >= 4 * GB
    row = _sft_row(cuda)
    assert row["peak_memory_bytes"] < GB, row["peak_memory_bytes"]
