"""The DICOM node against a real PACS (Orthanc, Debian's package), in two parts:

1. throughput: N radiographs (DX DICOMs made from the real NIH PNGs) pushed over K concurrent
   associations to ``cxr dicom listen``; images/s from the first C-STORE to the last report
   stored in Orthanc, with and without Grad-CAM overlays, each against the bare batched
   forward (the model alone on preprocessed batches, timed just before and after the phase)
   and ``cxr predict``'s images/s on the same files; then the listener's peak memory
   (VmHWM) under 16 concurrent senders;
2. a SIGKILL part-way: N fresh images pushed over K associations whose senders retry what
   was not acknowledged (as a PACS does), the listener killed after a third of them were
   acknowledged and started again on the same spool and store; then every acknowledged
   image must have exactly one SR in Orthanc and one row in the store.

    python benchmarks/dicom_node.py --images 200 --associations 4
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian
from pynetdicom import AE

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from support.media import radiograph_dicom, untrained_bundle  # noqa: E402
from support.services import free_port, running_orthanc  # noqa: E402

from cxr.engine.inference import load_predictor, predict_files  # noqa: E402

NIH_IMAGES = ROOT.parent / "shared" / "data" / "nih" / "images"
WAIT_S = 900


def make_inputs(count: int, folder: Path) -> list[Path]:
    """``count`` DX files from the NIH PNGs (every fourth one 16-bit), new UIDs each call."""
    folder.mkdir(parents=True)
    pngs = sorted(NIH_IMAGES.glob("*.png"))
    files = []
    for n in range(count):
        with Image.open(pngs[n % len(pngs)]) as image:
            gray = np.asarray(image.convert("L"))
        pixels = gray.astype(np.uint16) * 257 if n % 4 == 3 else gray
        path = folder / f"{n:04d}.dcm"
        path.write_bytes(radiograph_dicom(pixels, view="AP" if n % 5 == 0 else "PA"))
        files.append(path)
    return files


def start_listener(
    bundle: Path, orthanc, folder: Path, port: int, args, extra=()
) -> subprocess.Popen:
    command = [sys.executable, "-m", "cxr", "dicom", "listen", str(bundle), "--port", str(port)]
    command += list(extra)
    command += ["--forward", f"127.0.0.1:{orthanc.dicom_port}:{orthanc.ae_title}"]
    command += ["--spool", str(folder / "spool"), "--db", str(folder / "results.sqlite")]
    command += ["--workers", str(args.workers), "--max-batch", str(args.max_batch)]
    log_path = folder / "listener.log"
    start = log_path.stat().st_size if log_path.exists() else 0  # a restart appends
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    with log_path.open("ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + WAIT_S
    # The port opens before the model loads: time from "model ready", not from the port.
    while b"model ready" not in log_path.read_bytes()[start:]:
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(log_path.read_text())
        time.sleep(0.1)
    return process


class Pusher(threading.Thread):
    """One sending PACS: C-STOREs its files over one association, and when the listener
    goes away, associates again and resends whatever was not acknowledged."""

    def __init__(self, port: int, files: list[Path], acked: set, lock: threading.Lock):
        super().__init__(daemon=True)
        self.port, self.files, self.acked, self.lock = port, list(files), acked, lock

    def run(self) -> None:
        ae = AE(ae_title="PACS")
        ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
        pending = list(self.files)
        deadline = time.monotonic() + WAIT_S
        while pending and time.monotonic() < deadline:
            assoc = ae.associate("127.0.0.1", self.port, ae_title="CXR")
            if not assoc.is_established:
                time.sleep(0.2)
                continue
            while pending and assoc.is_established:
                dataset = pydicom.dcmread(pending[0])
                status = assoc.send_c_store(dataset)
                if status and int(status.get("Status", -1)) == 0:
                    with self.lock:
                        self.acked.add(str(dataset.SOPInstanceUID))
                    pending.pop(0)
                else:
                    break
            if assoc.is_established:
                assoc.release()


def push(port: int, files: list[Path], associations: int) -> tuple[list[Pusher], set]:
    acked: set[str] = set()
    lock = threading.Lock()
    pushers = [Pusher(port, files[k::associations], acked, lock) for k in range(associations)]
    for pusher in pushers:
        pusher.start()
    return pushers, acked


def store_counts(folder: Path) -> Counter:
    with sqlite3.connect(folder / "results.sqlite", timeout=30) as connection:
        return Counter(s for (s,) in connection.execute("SELECT status FROM results"))


def wait_sent(folder: Path, count: int) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if (folder / "results.sqlite").exists() and store_counts(folder)["sent"] >= count:
            return
        time.sleep(0.05)
    raise RuntimeError(f"not all sent: {store_counts(folder)}")


def orthanc_sources(orthanc) -> Counter:
    """Referenced image -> number of SRs in Orthanc that report on it."""
    sources: Counter = Counter()
    for found in orthanc.instances(modality="SR"):
        report = pydicom.dcmread(io.BytesIO(orthanc.get(f"/instances/{found['ID']}/file")))
        (evidence,) = report.CurrentRequestedProcedureEvidenceSequence
        (series,) = evidence.ReferencedSeriesSequence
        sources[str(series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)] += 1
    return sources


def overlay_bundle(bundle: Path, work: Path, positives: int) -> Path:
    """A copy of ``bundle`` whose first ``positives`` findings are always called positive
    (threshold 0), so that every image gets that many Grad-CAM overlays."""
    import shutil

    from cxr.model.bundle import update_bundle_meta

    folder = Path(shutil.copytree(bundle, work / "bundle-overlays"))
    labels = load_predictor(folder).labels
    update_bundle_meta(folder, thresholds=[0.0] * positives + [1.0] * (len(labels) - positives))
    return folder


def peak_rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of a process, from /proc (VmRSS, VmHWM)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def node_phase(model: Path, orthanc, work: Path, files: list[Path], args, *, name, extra=(),
               associations=None) -> dict:  # fmt: skip
    """Push ``files`` to a fresh listener; images/s from the first C-STORE to the last SR
    stored at the PACS, and the listener's memory when ready and at its peak."""
    folder = work / f"node-{name}"
    folder.mkdir()
    port = free_port()
    listener = start_listener(model, orthanc, folder, port, args, extra=extra)
    try:
        ready_rss, _ = peak_rss_mb(listener.pid)
        started = time.perf_counter()
        push(port, files, associations or args.associations)
        wait_sent(folder, len(files))
        seconds = time.perf_counter() - started
        _, peak = peak_rss_mb(listener.pid)
    finally:
        listener.send_signal(signal.SIGTERM)
        listener.wait(timeout=WAIT_S)
    return {"images_per_s": len(files) / seconds, "rss_ready_mb": ready_rss, "rss_peak_mb": peak}


def throughput(bundle: Path, orthanc, work: Path, args) -> dict:
    """Each listener phase between two timings of the bare batched forward (the same model,
    backend and batch size, in this process), so that each ratio is measured in one stretch."""
    from serve_batching import BareForward

    files = make_inputs(args.images, work / "inputs")
    predictor = load_predictor(bundle)
    predict_files(predictor, files[:16], workers=0)  # warm-up
    started = time.perf_counter()
    result = predict_files(predictor, files)
    predict_s = time.perf_counter() - started
    assert not result.errors, result.errors
    bare = BareForward(bundle, "auto", work / "bare-cache", files[:16], args.max_batch, 64)
    with_overlays = overlay_bundle(bundle, work, args.positives)
    phases = {
        "reports": (bundle, (), args.associations),
        "reports+overlays": (with_overlays, ("--overlays",), args.associations),
        "16 senders": (bundle, (), 16),
    }
    figures = {
        "images": len(files),
        "backend": predictor.backend,
        "predict_images_per_s": len(files) / predict_s,
    }
    for name, (model, extra, associations) in phases.items():
        before = bare.per_s()
        phase = node_phase(model, orthanc, work, files, args, name=name.replace(" ", "-"),
                           extra=extra, associations=associations)  # fmt: skip
        phase["bare_images_per_s"] = (before + bare.per_s()) / 2
        phase["ratio_to_bare"] = phase["images_per_s"] / phase["bare_images_per_s"]
        figures[name] = phase
    return figures


def kill_and_restart(bundle: Path, orthanc, work: Path, args) -> dict:
    files = make_inputs(args.images, work / "inputs-kill")
    folder = work / "node-kill"
    folder.mkdir()
    port = free_port()
    listener = start_listener(bundle, orthanc, folder, port, args)
    pushers, acked = push(port, files, args.associations)
    while len(acked) < len(files) // 3:
        time.sleep(0.01)
    listener.send_signal(signal.SIGKILL)
    listener.wait()
    at_kill = {"acked": len(acked), "store": dict(store_counts(folder))}
    listener = start_listener(bundle, orthanc, folder, port, args)
    try:
        for pusher in pushers:
            pusher.join(timeout=WAIT_S)
        wait_sent(folder, len(acked))
    finally:
        listener.send_signal(signal.SIGTERM)
        listener.wait(timeout=WAIT_S)
    sources = orthanc_sources(orthanc)
    with sqlite3.connect(folder / "results.sqlite") as connection:
        rows = Counter(u for (u,) in connection.execute("SELECT sop_instance_uid FROM results"))
    kill_uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    return {
        "at_kill": at_kill,
        "acknowledged": len(acked),
        "lost": sum(1 for uid in acked if sources[uid] == 0),
        "duplicated_sr": sum(sources[uid] - 1 for uid in kill_uids if sources[uid] > 1),
        "rows_missing": sum(1 for uid in acked if rows[uid] == 0),
        "rows_duplicated": sum(n - 1 for n in rows.values() if n > 1),
        "store": dict(store_counts(folder)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--associations", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=224, help="the untrained model's input")
    parser.add_argument("--workers", type=int, default=4, help="the listener's --workers")
    parser.add_argument("--max-batch", type=int, default=16, help="the listener's --max-batch")
    parser.add_argument("--positives", type=int, default=2, help="overlays per image (phase 2)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cxr-dicom-bench-") as tmp:
        work = Path(tmp)
        bundle = untrained_bundle(work / "bundle", args.image_size)
        with running_orthanc(work / "orthanc") as orthanc:
            speed = throughput(bundle, orthanc, work, args)
            print(json.dumps({"throughput": speed}, indent=2), flush=True)
            kill = kill_and_restart(bundle, orthanc, work, args)
            print(json.dumps({"sigkill": kill}, indent=2), flush=True)
    for name in ("reports", "reports+overlays", "16 senders"):
        phase = speed[name]
        print(
            f"{name}: {phase['images_per_s']:.1f} images/s C-STORE to SR at the PACS, "
            f"{100 * phase['ratio_to_bare']:.0f} % of the bare batched forward "
            f"({phase['bare_images_per_s']:.1f} images/s); listener memory "
            f"{phase['rss_ready_mb']:.0f} MB ready, {phase['rss_peak_mb']:.0f} MB peak"
        )
    print(
        f"cxr predict {speed['predict_images_per_s']:.1f} images/s ({speed['backend']}); "
        f"SIGKILL after {kill['at_kill']['acked']} acknowledged: "
        f"{kill['acknowledged']} acknowledged, {kill['lost']} lost, "
        f"{kill['duplicated_sr']} duplicated SRs, {kill['rows_missing']} rows missing, "
        f"{kill['rows_duplicated']} duplicated rows"
    )


if __name__ == "__main__":
    main()
