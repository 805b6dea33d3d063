"""The DICOM node in one process, with a pynetdicom Storage SCP standing in for the PACS:
what it accepts and refuses (and says why), that each accepted image gets one report whose
probabilities are what ``cxr predict`` gives for the same file, the spool and the store
across a restart, and delivery that waits for a destination that is down.

The round trip through a real PACS (Orthanc) is tests/test_dicom_orthanc.py."""

from __future__ import annotations

import io
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_support import (
    BAD_NAMES,
    bad_inputs,
    good_inputs,
    nih_gray,
    referenced_image,
    report_findings,
    send,
    text_items,
)
from PIL import Image
from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage
from pynetdicom import AE, evt
from support.media import radiograph_dicom, untrained_bundle
from support.services import free_port

from cxr.dicom.checks import Refused, check_instance
from cxr.dicom.forward import Destination
from cxr.dicom.listen import build_node
from cxr.dicom.node import NodeOptions
from cxr.engine.inference import load_predictor, predict_files
from cxr.model.bundle import weights_digest

WAIT_S = 120  # a hang guard, never a timing assertion


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> Path:
    return untrained_bundle(tmp_path_factory.mktemp("dicom-bundle"), 64, seed=3)


class Sink:
    """A Storage SCP that keeps what it receives (the stand-in PACS)."""

    def __init__(self, port: int = 0):
        self.received: list[pydicom.Dataset] = []
        self.lock = threading.Lock()
        ae = AE(ae_title="SINK")
        ae.add_supported_context(ComprehensiveSRStorage)
        ae.add_supported_context(SecondaryCaptureImageStorage)
        self.server = ae.start_server(
            ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )
        self.port = self.server.server_address[1]

    def _store(self, event):
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        with self.lock:
            self.received.append(dataset)
        return 0x0000

    def reports(self) -> list[pydicom.Dataset]:
        with self.lock:
            return [d for d in self.received if d.SOPClassUID == ComprehensiveSRStorage]

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def sink():
    running = Sink()
    yield running
    running.stop()


@pytest.fixture
def make_node(bundle, tmp_path):
    nodes = []

    def make(port: int, **options):
        node = build_node(
            bundle,
            Destination("127.0.0.1", port, "SINK"),
            NodeOptions(port=0, **{"allowed_ae": ("PACS",), "workers": 2, **options}),
            spool=tmp_path / "spool",
            db=str(tmp_path / "results.sqlite"),
        )
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.stop()
        node.store.close()


def store_rows(tmp_path: Path) -> list[dict]:
    """The results table read with sqlite3 itself."""
    with sqlite3.connect(tmp_path / "results.sqlite") as connection:
        connection.row_factory = sqlite3.Row
        return [dict(r) for r in connection.execute("SELECT * FROM results ORDER BY id")]


def reference_probabilities(bundle: Path, inputs: dict[str, bytes], folder: Path) -> dict:
    """SOP Instance UID -> what ``cxr predict`` gives for the same file."""
    folder.mkdir()
    files = []
    for name, data in inputs.items():
        (folder / f"{name}.dcm").write_bytes(data)
        files.append(folder / f"{name}.dcm")
    result = predict_files(load_predictor(bundle), files, workers=0)
    assert not result.errors
    uids = {str(f): str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    return {uids[f]: row for f, row in zip(result.files, result.probabilities)}


@pytest.mark.slow
def test_each_image_gets_one_report_equal_to_cxr_predict(bundle, sink, make_node, tmp_path):
    inputs = good_inputs()
    node = make_node(sink.port).start()
    datasets = [pydicom.dcmread(io.BytesIO(data)) for data in inputs.values()]
    assert send(node.address[1], datasets) == [(0x0000, "")] * len(datasets)
    assert node.wait(lambda: node.counts.sent >= len(datasets), WAIT_S)

    expected = reference_probabilities(bundle, inputs, tmp_path / "files")
    predictor = load_predictor(bundle)
    reports = {referenced_image(r)[1]: r for r in sink.reports()}
    assert sorted(reports) == sorted(expected)
    for source in datasets:
        report = reports[str(source.SOPInstanceUID)]
        assert referenced_image(report) == (str(source.SOPClassUID), str(source.SOPInstanceUID))
        assert report.StudyInstanceUID == source.StudyInstanceUID
        assert report.PatientID == source.PatientID
        findings = report_findings(report)
        assert list(findings) == predictor.labels
        got = np.array([findings[label]["probability"] for label in predictor.labels])
        np.testing.assert_allclose(got, expected[str(source.SOPInstanceUID)], rtol=0, atol=1e-9)
        for label, threshold in zip(predictor.labels, predictor.thresholds):
            assert findings[label]["threshold"] == threshold
            assert findings[label]["positive"] == (findings[label]["probability"] >= threshold)
        texts = text_items(report)
        assert weights_digest(bundle / "model.safetensors") in texts["Algorithm Parameters"]
        assert texts["Algorithm Name"] and texts["Algorithm Version"]

    rows = store_rows(tmp_path)
    assert [r["status"] for r in rows] == ["sent"] * len(datasets)
    assert all(r["patient_ref"] and r["patient_ref"] != "cxr-test" for r in rows)
    assert not any((tmp_path / "spool" / "incoming").iterdir())
    assert not any((tmp_path / "spool" / "outgoing").iterdir())


def test_bad_instances_are_refused_with_their_reason_and_the_association_goes_on(
    sink, make_node, tmp_path
):
    bad = bad_inputs()
    good = pydicom.dcmread(io.BytesIO(radiograph_dicom(nih_gray(1))))
    node = make_node(sink.port).start()
    answers = send(node.address[1], [dataset for dataset, _ in bad.values()] + [good])
    assert answers[-1] == (0x0000, "")  # the same association, after five refusals
    for (status, comment), (name, (_, reason)) in zip(answers, bad.items()):
        assert status == 0xC000, name
        assert reason in comment, (name, comment)
    assert node.wait(lambda: node.counts.sent == 1, WAIT_S)

    rows = {r["sop_instance_uid"]: r for r in store_rows(tmp_path)}
    for name, (dataset, reason) in bad.items():
        row = rows[str(dataset.SOPInstanceUID)]
        assert row["status"] == "refused" and reason in row["reason"], name
        assert row["calling_ae"] == "PACS"
    assert rows[str(good.SOPInstanceUID)]["status"] == "sent"
    assert not any((tmp_path / "spool" / "incoming").iterdir())  # refused: never spooled


def test_a_calling_ae_title_not_allowed_is_rejected(sink, make_node, tmp_path):
    node = make_node(sink.port).start()
    good = pydicom.dcmread(io.BytesIO(radiograph_dicom(nih_gray(0))))
    assert send(node.address[1], [good], ae_title="INTRUDER") is None
    assert send(node.address[1], [good]) == [(0x0000, "")]  # the node goes on
    assert node.wait(lambda: node.counts.sent == 1, WAIT_S)
    assert node.counts.rejected == {"calling AE title not recognised": 1}
    assert [r["status"] for r in store_rows(tmp_path)] == ["sent"]  # no row for the rejection


@pytest.mark.slow
def test_an_image_sent_twice_gets_one_report_and_one_row(sink, make_node, tmp_path):
    node = make_node(sink.port).start()
    image = pydicom.dcmread(io.BytesIO(radiograph_dicom(nih_gray(0))))
    assert send(node.address[1], [image, image]) == [(0x0000, "")] * 2
    assert node.wait(lambda: node.counts.sent == 1 and node.counts.received == 1, WAIT_S)
    assert send(node.address[1], [image]) == [(0x0000, "")]  # after it was sent, too
    node.stop()
    assert len(sink.reports()) == 1
    assert len(store_rows(tmp_path)) == 1


@pytest.mark.slow
def test_a_restart_finishes_what_the_spool_and_the_store_hold(bundle, sink, make_node, tmp_path):
    """What a killed listener leaves: an image received but not predicted, a report made but
    not sent, and an image spooled but never recorded (so never acknowledged)."""
    node = make_node(sink.port)
    received = pydicom.dcmread(io.BytesIO(radiograph_dicom(nih_gray(0))))
    predicted = pydicom.dcmread(io.BytesIO(radiograph_dicom(nih_gray(1))))
    unrecorded = radiograph_dicom(nih_gray(0))
    unrecorded_uid = str(pydicom.dcmread(io.BytesIO(unrecorded)).SOPInstanceUID)
    for dataset in (received, predicted):
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        node.spool.put_incoming(str(dataset.SOPInstanceUID), buffer.getvalue())
        node.store.admit(str(dataset.SOPInstanceUID))
    # The predicted one: as the first run left it, report written, row updated.
    probabilities = np.full(len(node.model.labels), 0.25)
    report = node.reports.report(predicted, probabilities)
    node.spool.put_outgoing(str(predicted.SOPInstanceUID), [report])
    node.store.predicted(
        str(predicted.SOPInstanceUID), model_digest="x", probabilities={}, calls={}
    )
    node.spool.put_incoming(unrecorded_uid, unrecorded)

    node.start()
    assert node.wait(lambda: node.counts.sent >= 2, WAIT_S)
    node.stop()
    by_source = {referenced_image(r)[1]: r for r in sink.reports()}
    assert sorted(by_source) == sorted(
        [str(received.SOPInstanceUID), str(predicted.SOPInstanceUID)]
    )
    # The report made before the restart is the one sent, not a new prediction.
    kept = report_findings(by_source[str(predicted.SOPInstanceUID)])
    assert {v["probability"] for v in kept.values()} == {0.25}
    rows = {r["sop_instance_uid"]: r["status"] for r in store_rows(tmp_path)}
    assert rows == {str(received.SOPInstanceUID): "sent", str(predicted.SOPInstanceUID): "sent"}
    assert not any((tmp_path / "spool" / "incoming").iterdir())


@pytest.mark.slow
def test_reports_wait_for_a_destination_that_is_down(sink, make_node, tmp_path):
    port = free_port()  # nothing listens there yet
    node = make_node(port, retry_max_s=2.0).start()
    image = pydicom.dcmread(io.BytesIO(radiograph_dicom(nih_gray(0))))
    assert send(node.address[1], [image]) == [(0x0000, "")]
    assert node.wait(lambda: (store_rows(tmp_path)[0]["attempts"] or 0) >= 1, WAIT_S)
    row = store_rows(tmp_path)[0]
    assert row["status"] == "predicted" and "unreachable" in row["reason"]
    late = Sink(port)
    try:
        assert node.wait(lambda: len(late.reports()) == 1, WAIT_S)
        assert node.wait(lambda: store_rows(tmp_path)[0]["status"] == "sent", WAIT_S)
    finally:
        late.stop()


@pytest.mark.slow
def test_overlays_are_secondary_captures_not_for_primary_diagnosis(bundle, tmp_path, sink):
    # Only the first finding can be positive: threshold 0 for it, above any probability
    # for the others.
    from cxr.model.bundle import update_bundle_meta

    folder = tmp_path / "bundle"
    untrained_bundle(folder, 64, seed=3)
    labels = load_predictor(folder).labels
    update_bundle_meta(folder, thresholds=[0.0] + [1.0] * (len(labels) - 1))
    node = build_node(
        folder,
        Destination("127.0.0.1", sink.port, "SINK"),
        NodeOptions(port=0, overlays=True, workers=1),
        spool=tmp_path / "spool",
        db=str(tmp_path / "results.sqlite"),
    ).start()
    try:
        image = pydicom.dcmread(io.BytesIO(radiograph_dicom(nih_gray(0))))
        assert send(node.address[1], [image]) == [(0x0000, "")]
        assert node.wait(lambda: len(sink.received) == 2, WAIT_S)
    finally:
        node.stop()
        node.store.close()
    (capture,) = [d for d in sink.received if d.SOPClassUID == SecondaryCaptureImageStorage]
    assert "NOT FOR PRIMARY DIAGNOSIS" in capture.ImageComments
    assert "NOT FOR PRIMARY DIAGNOSIS" in capture.SeriesDescription
    assert capture.BurnedInAnnotation == "YES" and "DERIVED" in capture.ImageType
    assert labels[0] in capture.ImageComments
    assert capture.StudyInstanceUID == image.StudyInstanceUID
    assert capture.SourceImageSequence[0].ReferencedSOPInstanceUID == image.SOPInstanceUID
    pixels = capture.pixel_array
    assert pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.std() > 0


@pytest.mark.parametrize("name", BAD_NAMES)
def test_check_instance_refuses_with_the_reason(name):
    dataset, reason = bad_inputs()[name]
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    with pytest.raises(Refused, match=reason.replace("(", r"\(")):
        check_instance(buffer.getvalue())


def test_check_instance_refuses_a_uid_that_is_not_one():
    data = radiograph_dicom(nih_gray(0)[:64, :64], SOPInstanceUID="1.2.3/../../etc")
    with pytest.raises(Refused, match=r"SOPInstanceUID is .* not a valid UID"):
        check_instance(data)
    for good in good_inputs().values():
        assert check_instance(good).sop_instance_uid


@pytest.mark.slow
def test_the_fast_report_is_the_one_highdicom_builds(bundle):
    """ReportMaker fills a template; highdicom building each report itself is the reference.
    Element by element they agree, but for the creation and content times."""
    from cxr.dicom.listen import model_digest
    from cxr.dicom.report import ReportMaker, highdicom_report, model_info

    model = model_info(load_predictor(bundle).meta, model_digest(bundle))
    maker = ReportMaker(model)
    rng = np.random.default_rng(0)
    sources = [
        pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        for data in good_inputs().values()
    ]
    for source in [*sources, sources[0]]:  # the template is reused: nothing of one stays
        probabilities = rng.random(len(model.labels))
        fast = pydicom.dcmread(io.BytesIO(maker.report(source, probabilities)))
        built = io.BytesIO()
        highdicom_report(source, model, probabilities).save_as(built, enforce_file_format=True)
        reference = pydicom.dcmread(io.BytesIO(built.getvalue()))  # both as files
        timing = {"InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime"}
        for report in (fast, reference):
            for equipment in report.ContributingEquipmentSequence:
                del equipment.ContributionDateTime
        keywords = {e.keyword for e in reference} | {e.keyword for e in fast}
        for keyword in sorted(keywords - timing):
            assert fast.get(keyword) == reference.get(keyword), keyword
        assert fast.file_meta.MediaStorageSOPInstanceUID == reference.SOPInstanceUID


def test_a_report_leaves_its_source_header_as_it_was(bundle):
    """The template is filled for the next image while the previous image's overlays are
    still being made from its header: nothing of the next image may reach that header."""
    from cxr.dicom.listen import model_digest
    from cxr.dicom.report import ReportMaker, model_info

    maker = ReportMaker(model_info(load_predictor(bundle).meta, model_digest(bundle)))
    first, second = (
        pydicom.dcmread(io.BytesIO(radiograph_dicom(nih_gray(i), PatientID=f"P{i}")))
        for i in (0, 1)
    )
    before = {e.keyword: e.value for e in first if e.keyword != "PixelData"}
    probabilities = np.full(len(maker.model.labels), 0.5)
    maker.report(first, probabilities)
    maker.report(second, probabilities)
    assert {e.keyword: e.value for e in first if e.keyword != "PixelData"} == before


@pytest.mark.slow
def test_overlays_of_many_patients_in_one_association_are_each_filed_under_their_own(
    tmp_path, sink
):
    """Six patients, each a study of one image, over one association to two workers, three
    findings positive in each: every overlay carries its own source's patient, study and
    reference, and its pixels are its own source's (they correlate with its crop best)."""
    from cxr.model.bundle import update_bundle_meta

    folder = untrained_bundle(tmp_path / "bundle", 64, seed=3)
    labels = load_predictor(folder).labels
    update_bundle_meta(folder, thresholds=[0.0] * 3 + [1.0] * (len(labels) - 3))
    grays = [v for g in (nih_gray(0), nih_gray(1)) for v in (g, g[:, ::-1], g[::-1, :])]
    sources = [
        pydicom.dcmread(io.BytesIO(radiograph_dicom(np.ascontiguousarray(gray), PatientID=f"P{n}")))
        for n, gray in enumerate(grays)
    ]
    node = build_node(
        folder,
        Destination("127.0.0.1", sink.port, "SINK"),
        NodeOptions(port=0, overlays=True, workers=2),
        spool=tmp_path / "spool",
        db=str(tmp_path / "results.sqlite"),
    ).start()
    try:
        assert send(node.address[1], sources) == [(0x0000, "")] * len(sources)
        assert node.wait(lambda: len(sink.received) == len(sources) * 4, WAIT_S)
    finally:
        node.stop()
        node.store.close()
    by_uid = {str(s.SOPInstanceUID): s for s in sources}
    crops = {
        uid: load_predictor(folder).preprocess.crop_resized(s.pixel_array).astype(float)
        for uid, s in by_uid.items()
    }
    captures = [d for d in sink.received if d.SOPClassUID == SecondaryCaptureImageStorage]
    assert len(captures) == len(sources) * 3
    for capture in captures:
        (reference,) = capture.SourceImageSequence
        source = by_uid[str(reference.ReferencedSOPInstanceUID)]
        assert capture.ReferencedImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert capture.PatientID == source.PatientID
        assert capture.StudyInstanceUID == source.StudyInstanceUID
        pixels = capture.pixel_array.astype(float)
        square = pixels[-pixels.shape[1] :].mean(axis=2)  # the overlay below the text
        size = crops[str(source.SOPInstanceUID)].shape[0]
        small = np.asarray(
            Image.fromarray(square.astype(np.uint8)).resize((size, size), Image.BILINEAR), float
        )
        correlation = {
            uid: np.corrcoef(small.ravel(), crop.ravel())[0, 1] for uid, crop in crops.items()
        }
        assert max(correlation, key=correlation.get) == str(source.SOPInstanceUID)
    numbers = [(c.SeriesInstanceUID, c.InstanceNumber) for c in captures]
    assert len(set(numbers)) == len(numbers)  # unique in their series
    for report in sink.reports():
        source = by_uid[referenced_image(report)[1]]
        assert (report.PatientID, report.StudyInstanceUID) == (
            source.PatientID,
            source.StudyInstanceUID,
        )
