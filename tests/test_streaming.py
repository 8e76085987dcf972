"""data.streaming: a set streamed through `datasets` (here local ones: the Hub cannot be reached) trains,
and a stopped run resumes at the next sample although a stream has no random access."""

from __future__ import annotations

import pytest
import torch

from helpers import TINY, recipe_file, run_cli, sigterm_then_resume_matches_an_uninterrupted_run, take
from vitcli.data import ImageSet, LoaderSpec, TransformSpec, build_transform, load_split, make_stream_loader
from vitcli.data.hub_stream import SNAPSHOT_EVERY, streamed


def loader(*, workers=0, buffer=40, batch=8, epoch=0):
    transform = build_transform(TransformSpec(crop_scale=(0.5, 1.0), hflip=0.5, crop_pct=1.0, interpolation="bilinear"),
                                (8, 8), train=True)
    digits = load_split("digits", "train")
    return make_stream_loader(streamed(digits), transform, LoaderSpec.training(batch, num_workers=workers, seed=5), epoch=epoch,
                              buffer=buffer)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_restored_hub_stream_gives_exactly_the_batches_of_an_uninterrupted_one(workers):
    straight = take(loader(workers=workers), 200)  # past one epoch of 1,437 digits
    first = loader(workers=workers)
    take(first, 23)  # 184 emitted: the buffer reaches back past several snapshots
    state = first.state_dict()
    first.close()
    resumed = loader(workers=workers)
    assert resumed.load_state_dict(state)
    rest = take(resumed, 177)
    assert all(torch.equal(y, v) and torch.equal(x, u) for (x, y), (u, v) in zip(straight[23:], rest))
    assert SNAPSHOT_EVERY < 184


def test_a_streamed_epoch_emits_every_image_once_but_the_buffered():
    digits = load_split("digits", "train")
    n = len(digits)
    numbered = ImageSet(digits.dataset.remove_columns("label").add_column("label", list(range(n))), n,
                        [str(i) for i in range(n)], "numbered", "train")  # the label is the sample's row
    transform = build_transform(TransformSpec(crop_pct=1.0), (8, 8), train=False)

    def emitted(epoch):
        stream = make_stream_loader(streamed(numbered), transform, LoaderSpec.training(37, seed=5), epoch=epoch, buffer=40)
        return torch.cat([y for _, y in take(stream, (n - 40) // 37)]).tolist()

    first = emitted(0)
    assert len(first) == len(set(first)) == (n - 40) // 37 * 37  # all distinct: nothing of epoch 1 yet
    assert emitted(0) == first and emitted(1) != first  # seeded per epoch


ARGS = [*sum((["--set", s] for s in TINY), []), "--set", "model.img_size=8", "--set", "model.patch_size=2",
        "--set", "train.batch_size=16", "--set", "train.eval_every=100", "--set", "model.drop_rate=0.1",
        "--set", "data.dataset=digits", "--set", "data.streaming=true", "--set", "data.shuffle_buffer=100"]


@pytest.mark.slow
def test_sigterm_then_resume_of_a_streamed_run_matches_an_uninterrupted_run(tmp_path):
    sigterm_then_resume_matches_an_uninterrupted_run(tmp_path, [*ARGS, "--set", "data.num_workers=2"])


def test_streaming_a_hub_set_offline_is_one_clear_message(tmp_path, capsys):
    recipe = recipe_file(tmp_path, "train: {steps: 4}\n")
    code = run_cli("pretrain", str(recipe), "--out", str(tmp_path / "r"), *ARGS, "--set", "data.dataset=cifar100")
    err = capsys.readouterr().err
    assert code == 2 and "cannot be streamed: the Hub is offline" in err and "Traceback" not in err
