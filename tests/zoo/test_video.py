"""Video streams on the real fixed-camera clips: decoding, order and timestamps, damaged and
unreadable files, and the per-frame class map (MOG2 labels) on frames whose answer is known."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from apparate.zoo.video import (VideoError, check_stream, decode_clip, footage_stream, iter_frames, probe,
                                resolve_stream)


@pytest.fixture(scope="module")
def clips(data_dir):
    return data_dir / "video"


def damaged_copy(src, dst, at=(0.4, 0.7), size=3000):
    """A copy with `size` seeded random bytes written over the data at each share of the file."""
    data = bytearray(src.read_bytes())
    rng = np.random.default_rng(0)
    for share in at:
        o = int(len(data) * share)
        data[o:o + size] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    dst.write_bytes(bytes(data))
    return dst


def test_probe_and_decode_a_few_frames(clips):
    info = probe(clips / "car-detection.mp4")
    assert (info.width, info.height, info.fps, info.frames) == (768, 432, 12.5, 377)
    frames = list(iter_frames(clips / "car-detection.mp4", size=(48, 64), limit=4))
    assert [i for i, _ in frames] == [0, 1, 2, 3]
    assert all(f.shape == (48, 64, 3) and f.dtype == np.uint8 for _, f in frames)
    # The car park is grey asphalt: no colour cast from a swapped or missing conversion.
    mean = frames[0][1].reshape(-1, 3).mean(axis=0)
    assert 40 < mean.min() and mean.max() - mean.min() < 20


def test_frames_come_in_camera_order(clips):
    """The motorway clip has B-frames (decode order differs from display order): our frames must
    match OpenCV's own reader frame by frame, in display order."""
    import cv2

    path = clips / "highway-cyclist.avi"
    ours = [f for _, f in iter_frames(path, fmt="bgr24", limit=12)]
    cap = cv2.VideoCapture(str(path))
    theirs = [cap.read()[1] for _ in range(12)]
    diffs = np.array([[np.abs(a.astype(int) - b.astype(int)).mean() for b in theirs] for a in ours])
    assert (diffs.argmin(axis=1) == np.arange(12)).all()
    assert np.diag(diffs).max() < 2.0


def test_folder_stream_order_and_timestamps(clips, tmp_path):
    shutil.copy(clips / "highway-cyclist.avi", tmp_path / "a-motorway.avi")
    shutil.copy(clips / "car-detection.mp4", tmp_path / "b-car-park.mp4")
    (tmp_path / "notes.txt").write_text("not a video")
    s = footage_stream(tmp_path, size=(24, 32), n=760)
    assert len(s) == 760 and s.inputs.shape == (760, 24, 32, 3) and (s.labels == -1).all()
    assert s.meta["phases"] == ["a-motorway", "b-car-park"]
    phase, ts = s.meta["phase"], s.meta["timestamp"]
    first = int((phase == 0).sum())
    assert first == 748 and (phase[first:] == 1).all()
    np.testing.assert_allclose(ts[:first], np.arange(first) / 25.0)
    # The second camera starts one frame period after the first one's last frame, at its own rate.
    np.testing.assert_allclose(ts[first:], (first / 25.0) + np.arange(760 - first) / 12.5)
    alone = decode_clip(clips / "car-detection.mp4", (24, 32), limit=12)
    np.testing.assert_array_equal(s.inputs[first:], alone.frames)
    fixed = footage_stream(tmp_path, size=(24, 32), fps=30.0, n=760)
    np.testing.assert_allclose(fixed.meta["timestamp"], np.arange(760) / 30.0)


def test_damaged_frames_are_reported_and_skipped(clips, tmp_path):
    bad = damaged_copy(clips / "highway-cyclist.avi", tmp_path / "damaged.avi")
    said: list[str] = []
    clip = decode_clip(bad, (24, 32), warn=said.append)
    assert clip.bad_frames and len(said) == len(clip.bad_frames)
    for i, msg in zip(clip.bad_frames, said):
        assert f"frame {i} failed to decode" in msg and "damaged.avi" in msg
    # The run goes on: frames after the last damaged one are decoded, and in order.
    assert clip.index.max() > max(clip.bad_frames) + 100
    assert (np.diff(clip.index) > 0).all() and not set(clip.bad_frames) & set(clip.index.tolist())
    s = footage_stream(bad, size=(24, 32), warn=lambda m: None)
    assert len(s) == len(clip) and s.meta["bad_frames"] == [f"damaged.avi:{i}" for i in clip.bad_frames]


def test_unreadable_files_are_clear_errors(tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    with pytest.raises(VideoError, match="cannot read video .*garbage.mp4"):
        probe(garbage)
    with pytest.raises(VideoError, match="no video file or folder"):
        check_stream(f"video:{tmp_path / 'missing.mp4'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VideoError, match="holds no video files"):
        check_stream(f"video:{tmp_path / 'empty'}")
    check_stream("camera-day")  # a named stream is not a file


def test_cli_refuses_an_unreadable_video_before_any_work(tmp_path, capsys):
    from apparate.cli import main

    garbage = tmp_path / "garbage.avi"
    garbage.write_bytes(b"RIFF" + bytes(5000))
    # The bundle does not even exist: the video is checked first.
    rc = main(["record", str(tmp_path / "no-bundle"), "--stream", f"video:{garbage}", "--out", str(tmp_path / "r.npz")])
    assert rc == 2 and "cannot read video" in capsys.readouterr().err
    rc = main(["bench", "compare", "video-lite0", "--stream", f"video:{garbage}", "--out", str(tmp_path / "o")])
    assert rc == 2 and "cannot read video" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    rc = main(["loadgen", "http://127.0.0.1:9", "--stream", "cifar10-resnet20", "--stream-name", f"video:{garbage}"])
    assert rc == 2 and "cannot read video" in capsys.readouterr().err


def test_record_your_own_footage_with_a_real_model(r20, r20_bundle, clips, tmp_path, capsys):
    """`video:PATH` through `apparate record`: frames at the workload's size, times recorded."""
    from apparate.cli import main
    from apparate.core.recording import Recording

    s = resolve_stream(r20, f"video:{clips / 'highway.avi'}", n=6)
    assert s.inputs.shape == (6, 32, 32, 3)
    out = tmp_path / "rec.npz"
    rc = main(["record", str(r20_bundle.path), "--stream", f"video:{clips / 'highway.avi'}", "--n", "20",
               "--fps", "30", "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    rec = Recording.load(out)
    assert rec.num_inputs == 20 and rec.num_sites == r20_bundle.num_sites
    np.testing.assert_allclose(rec.meta["per_input_timestamp"], np.arange(20) / 30.0)


def test_loadgen_sends_your_footage_at_the_served_size(data_dir, clips):
    from apparate.client.loadgen import stream_payloads

    p = stream_payloads("cifar10-resnet20", f"video:{clips / 'highway.avi'}", 5, str(data_dir))
    assert len(p.bodies) == 5 and (p.labels == -1).all()
    raw = 32 * 32 * 3  # binary tensor data: the JSON header, then the frame's bytes
    assert all(len(b.content) == int(b.headers["inference-header-content-length"]) + raw for b in p.bodies)


def test_class_map_on_real_frames(clips):
    """MOG2 labels of the car park against frames looked at by eye: empty asphalt is 0, a car is 1."""
    from apparate.zoo.video_labels import CLASS_NAMES, CLIPS, label_clip

    assert CLASS_NAMES[0].startswith("no vehicle") and CLASS_NAMES[1].startswith("vehicle")
    spec = next(c for c in CLIPS if c.file == "car-detection.mp4")
    lab = label_clip(clips / spec.file, spec)
    assert len(lab.labels) == 377 and (lab.index == np.arange(377)).all()
    empty, car = (0, 120, 300), (60, 200)
    assert [int(lab.labels[i]) for i in empty] == [0, 0, 0]
    assert [int(lab.labels[i]) for i in car] == [1, 1]
    # Cars drive through one or two at a time: a third of the frames, in runs, not flicker.
    assert 0.25 < lab.labels.mean() < 0.5
    assert np.abs(np.diff(lab.labels)).sum() < 20


def test_camera_day_splits_bootstrap_fine_tuning_and_held_back(clips):
    """The paper's split on real clips: the first 10% bootstraps the ramps and is never served;
    fine-tuning and held-back frames are disjoint 2-second blocks of the served part."""
    from apparate.zoo.video_labels import CLIPS
    from apparate.zoo.video_lite0 import CameraClip, camera_stream

    cams = []
    for spec, limit in zip(CLIPS[:2], (120, 200)):
        clip = decode_clip(clips / spec.file, (16, 16), limit=limit)
        block = int(round(2.0 * clip.info.fps))
        cams.append(CameraClip(spec, clip, np.arange(limit) % 2, boot_end=limit // 10, block=block))
    day = camera_stream("camera-day", cams, "served", "test")
    boot = camera_stream("bootstrap", cams, "bootstrap", "test")
    assert len(day) == 108 + 180 and len(boot) == 12 + 20
    assert day.meta["phases"] == ["car-park", "motorway"]
    frame, phase = day.meta["frame"], day.meta["phase"]
    assert (frame[phase == 0] == np.arange(12, 120)).all() and (frame[phase == 1] == np.arange(20, 200)).all()
    assert (boot.meta["frame"][boot.meta["phase"] == 0] == np.arange(12)).all()
    np.testing.assert_array_equal(day.labels[phase == 1], np.arange(20, 200) % 2)
    ts = day.meta["timestamp"]
    assert ts[0] == 0 and (np.diff(ts) > 0).all()
    for c in cams:
        ft, held = c.fine_tune_mask(2), c.held_back_mask()
        assert not (ft & held).any() and not ((ft | held) & ~c.served()).any()
        # Blocks alternate, fine-tuning first, and each kind covers about half the served part.
        first_held = np.flatnonzero(held)[0]
        assert first_held - c.boot_end == c.block and 0.35 < held[c.served()].mean() < 0.65
    assert len(day.take(slice(0, 5))) == 5
