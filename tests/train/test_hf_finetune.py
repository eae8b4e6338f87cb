"""The HF route: ``transformers.Trainer`` and ``peft`` LoRA on a btlm model (no remote code), fed by
``btlm data Summarization`` shards through :func:`btlm.data.loader.collate_hf`."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

from btlm.data.create_hdf5_dataset import run as prepare
from btlm.data.loader import H5SampleDataset, collate_hf, collate_rows
from btlm.data.options import load_config
from btlm.io import load_model, save_model
from btlm.train.zoo_model import lm_loss
from tests.conftest import make_model

LORA = dict(target_modules=["c_attn", "c_proj"], r=8, lora_alpha=16, lora_dropout=0.0)


def pairs_dir(tmp_path, name, prompts):
    """Summarization shards of pairs whose completion is always the same phrase (a task LoRA can learn)."""
    src = tmp_path / f"{name}_in"
    src.mkdir()
    (src / "p.jsonl").write_text("".join(json.dumps({"prompt": p, "completion": " green apples and pears"}) + "\n"
                                         for p in prompts))
    out = tmp_path / name
    prepare(load_config(None, dict(input_dir=str(src), output_dir=str(out), processes=1, max_seq_length=24,
                                   prompt_key="prompt", completion_key="completion", display_pbar=False,
                                   min_sequence_len=2),
                        "Summarization"), log=lambda *a: None)
    return H5SampleDataset(str(out))


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=4, learning_rate=1e-2,
                report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
                dataloader_num_workers=0)
    return TrainingArguments(**{**base, **kw})


def completion_loss(model, ds) -> float:
    with torch.no_grad():
        return float(model(**collate_hf(ds.read(list(range(len(ds)))))).loss)


def test_collate_hf_gives_the_loss_of_the_masked_rows(tmp_path):
    """HF's shifted-label loss on collate_hf batches equals the Model Zoo loss (num_tokens) on the rows."""
    ds = pairs_dir(tmp_path, "d", [f"Item {i} is" for i in range(3)])
    model = make_model(vocab_size=50257)
    rows = ds.read([0, 1, 2])
    hf = model(**collate_hf(rows)).loss
    batch = collate_rows(rows)
    ref = lm_loss(model(input_ids=batch["input_ids"].long()).logits, batch["labels"], batch["attention_mask"],
                  SimpleNamespace(loss_scaling="num_tokens", loss_weight=1.0))
    torch.testing.assert_close(hf, ref)


def test_trainer_two_steps_and_gradient_accumulation_equals_the_full_batch(tmp_path):
    """Trainer passes num_items_in_batch and then leaves the loss unscaled: the model must normalise by it,
    or micro-batches with different label counts would be weighted wrongly."""
    ids = torch.arange(16) % 97
    few, many = ids.clone(), ids.clone()
    few[:-3] = -100  # 2 label tokens after the shift
    data = [{"input_ids": ids, "labels": few}, {"input_ids": ids.flip(0), "labels": many}]
    trained = []
    for bs, ga in ((2, 1), (1, 2)):
        model = make_model().train()
        slopes = [m.slopes.clone() for m in model.modules() if hasattr(m, "slopes")]
        tr = Trainer(model=model, args=args(tmp_path, per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                                            max_steps=2, optim="sgd", lr_scheduler_type="constant"),
                     train_dataset=data)
        out = tr.train()
        assert out.global_step == 2 and np.isfinite(out.training_loss)
        assert all(torch.equal(a, m.slopes) for a, m in zip(slopes, (m for m in model.modules() if hasattr(m, "slopes"))))
        trained.append(model.state_dict())
    for k in trained[0]:
        torch.testing.assert_close(trained[0][k], trained[1][k], rtol=1e-5, atol=1e-6, msg=k)


def test_lora_learns_the_task_base_stays_identical_and_merges_exactly(tmp_path):
    train = pairs_dir(tmp_path, "train", [f"Fruit list number {i}:" for i in range(16)])
    held_out = pairs_dir(tmp_path, "held", [f"Shopping note {i}:" for i in range(4)])
    base = make_model(vocab_size=50257)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    before = completion_loss(base, held_out)

    model = get_peft_model(base, LoraConfig(**LORA))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    Trainer(model=model, args=args(tmp_path, max_steps=30), train_dataset=train, data_collator=collate_hf).train()
    model.eval()
    after = completion_loss(model, held_out)
    assert after < 0.5 * before, (before, after)
    frozen = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
              for k, v in model.state_dict().items() if ".lora_" not in k}
    assert frozen.keys() == base_state.keys()
    assert all(torch.equal(frozen[k], base_state[k]) for k in base_state)  # bit-identical, slopes included

    ids = collate_hf(held_out.read([0, 1]))["input_ids"]
    with torch.no_grad():
        adapter_logits = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")  # PEFT's format, loadable on a fresh base
    reloaded = PeftModel.from_pretrained(make_model(vocab_size=50257), tmp_path / "adapter").eval()
    merged = model.merge_and_unload()
    save_model(merged, tmp_path / "merged", tokenizer=False)
    loaded = load_model(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, adapter_logits, rtol=0, atol=0)
        torch.testing.assert_close(loaded(input_ids=ids).logits, adapter_logits, rtol=1e-5, atol=1e-5)
    prompt = ids[:1, :8]
    greedy = loaded.generate(prompt, max_new_tokens=4, do_sample=False)
    assert greedy.shape[1] > 8
    torch.testing.assert_close(reloaded.generate(input_ids=prompt, max_new_tokens=4, do_sample=False), greedy)


@pytest.mark.parametrize("name", ["c_attn", "c_proj"])
def test_lora_wraps_every_targeted_conv1d(name):
    model = get_peft_model(make_model(), LoraConfig(target_modules=[name], r=2))
    wrapped = [n for n, m in model.named_modules() if n.endswith(name) and hasattr(m, "lora_A")]
    # c_attn: one per layer; c_proj: attention and MLP output projections of every layer
    assert len(wrapped) == model.config.n_layer * (1 if name == "c_attn" else 2)
