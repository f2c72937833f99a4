"""The DES-SAM dock widget: load a model, predict the selected image, turn drawn boxes into
masks, export corrected boxes as a training set, train on the sets and predict again.

Each button collects its inputs from the layers (``layers`` converts), calls one library
function (``dessam_d2.inference.interactive``, ``dessam_d2.data.export``,
``dessam_d2.recipes.retrain``) in a napari thread worker, and turns its result into layers. One
job runs at a time, with the progress bar and Cancel below; the viewer stays responsive. A
user's mistake is a one-line notification (and ``messages`` keeps every one, for tests).

Paths are relative to the folder napari was started in, as for the tools: start it in the
repository's folder (``napari``, then Plugins > DES-SAM nuclei).
"""

import logging
import os
import threading
from typing import Callable, List, Optional, Tuple

import numpy as np
from napari.layers import Image, Labels, Shapes
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import QComboBox

from ..data.export import export_box_set
from ..errors import UsageError, UserError
from ..inference.interactive import Session, load_session, predict_image, segment_boxes
from ..recipes.retrain import DEMO_CONFIG, TrainingStopped, train_on_box_sets
from .forms import NO_LABELS, DessamForm
from .io import IMAGE_KEY, boxes_layer_data
from .layers import image_data_to_rgb, labels_data, rectangles_to_boxes, rows_to_features

__all__ = ["DessamWidget"]

logger = logging.getLogger(__name__)


class Cancelled(UserError):
    """The user pressed Cancel."""


class _Progress(QObject):
    """Carries a worker thread's progress to the Qt thread (a queued signal)."""

    changed = Signal(int, int)


class DessamWidget(DessamForm):
    """The plugin's dock widget (npe2 passes the viewer)."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.session: Optional[Session] = None
        self.messages: List[Tuple[str, str]] = []  # (level, text) of every notification
        self.worker = None
        self.job = ""
        self._stop = threading.Event()
        self._progress = _Progress()
        self._progress.changed.connect(self._show_progress)
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(self.refresh_layers)
        napari_viewer.layers.selection.events.active.connect(self.refresh_layers)
        self.refresh_layers()

    # -- layers ----------------------------------------------------------------------------
    def refresh_layers(self, event=None) -> None:
        """The layer choosers follow the viewer's layers (the active one of a kind first)."""
        active = self.viewer.layers.selection.active
        for combo, kind, extra in (
            (self.image_combo, Image, []),
            (self.boxes_combo, Shapes, []),
            (self.labels_combo, Labels, [NO_LABELS]),
        ):
            current = combo.currentText()
            names = [layer.name for layer in self.viewer.layers if isinstance(layer, kind)]
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(extra + names)
            if isinstance(active, kind):
                current = active.name
            if current in extra + names:
                combo.setCurrentText(current)
            combo.blockSignals(False)

    def _layer(self, combo: QComboBox, kind, what: str):
        name = combo.currentText()
        if name in self.viewer.layers and isinstance(self.viewer.layers[name], kind):
            return self.viewer.layers[name]
        raise UsageError(f"no {what} layer selected: add one, or pick it in the widget")

    def _image(self):
        layer = self._layer(self.image_combo, Image, "image")
        return layer, image_data_to_rgb(layer.data, layer.name, layer.rgb)

    def _boxes(self, image) -> Tuple[Shapes, object]:
        layer = self._layer(self.boxes_combo, Shapes, "Shapes (boxes)")
        if not len(layer.data):
            raise UsageError(f"layer '{layer.name}' has no boxes: draw rectangles around nuclei")
        return layer, rectangles_to_boxes(layer.data)

    def _session(self) -> Session:
        if self.session is None:
            raise UsageError("no model loaded: pick a config (and weights), press Load model")
        return self.session

    def _set_layer(self, data, kwargs, kind):
        """Add a layer, or replace the data of the one of that name (a re-prediction)."""
        name = kwargs["name"]
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        return getattr(self.viewer, f"add_{kind}")(data, **kwargs)

    # -- notifications and jobs ------------------------------------------------------------
    def notify(self, level: str, text: str) -> None:
        self.messages.append((level, text))
        {"error": show_error, "warning": show_warning}.get(level, show_info)(text)
        self.status.setText(text)

    def _failed(self, error: BaseException) -> None:
        if isinstance(error, (Cancelled, TrainingStopped)):
            self.notify("warning", str(error))
        elif isinstance(error, UserError):
            self.notify("error", str(error))
        else:  # a bug: the traceback goes to the console, one line to the user
            logger.error(f"{self.job} failed", exc_info=error)
            first = str(error).splitlines()[0] if str(error) else ""
            self.notify("error", f"{self.job} failed: {type(error).__name__}: {first}")

    def _run(self, job: str, work: Callable, done: Callable) -> None:
        """``work(progress)`` in a worker thread, then ``done(result)`` in the Qt thread;
        ``progress(step, total)`` moves the bar and raises ``Cancelled`` after Cancel."""
        if self.worker is not None:
            self.notify("warning", f"{self.job} is still running: wait for it, or press Cancel")
            return
        self._stop.clear()

        def progress(step: int, total: int) -> None:
            self._progress.changed.emit(step, total)
            if self._stop.is_set() and step < total:
                raise Cancelled(f"{job} cancelled at step {step} of {total}")

        def guarded(progress):
            # errors come back as values: napari would show a raised one with its traceback
            try:
                return True, work(progress)
            except Exception as e:  # noqa: BLE001 - shown in one line by _finish
                return False, e

        self.job = job
        worker = create_worker(guarded, progress, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(lambda result, w=worker: self._finish(w, done, result))
        worker.finished.connect(lambda w=worker: self._release(w))
        self.worker = worker
        self.progress_bar.setRange(0, 0)  # busy until the first step
        self.cancel_button.setEnabled(True)
        self.status.setText(f"{job} …")
        worker.start()

    def _finish(self, worker, done: Callable, outcome) -> None:
        self._release(worker)  # free for what ``done`` starts (training -> predicting)
        ok, result = outcome
        if not ok:
            self._failed(result)
            return
        try:
            done(result)
        except Exception as e:  # noqa: BLE001 - shown in one line, never as a dialog
            self._failed(e)

    def _release(self, worker) -> None:
        if self.worker is worker:
            self.worker = None
            self.cancel_button.setEnabled(False)
            self.progress_bar.setRange(0, 1)

    def _show_progress(self, step: int, total: int) -> None:
        self.progress_bar.setRange(0, max(total, 1))
        self.progress_bar.setValue(step)

    def cancel(self) -> None:
        """Stop the running job after its current step (a tile, a training step)."""
        self._stop.set()

    def _guard(self, action: Callable) -> None:
        try:
            action()
        except Exception as e:  # noqa: BLE001 - a user's mistake, in one line
            self._failed(e)

    # -- actions ---------------------------------------------------------------------------
    def load_model(self) -> None:
        config, weights = self.config_edit.text().strip(), self.weights_edit.text().strip()

        def work(progress):
            return load_session(config, weights)

        self._run("loading the model", work, self._loaded)

    def _loaded(self, session: Session) -> None:
        self.session = session
        info = session.describe()
        self.model_info.setText("\n".join(f"{k}: {v}" for k, v in info.items()))
        self.notify("info", f"model loaded: {info['variant']}, {info['dtype']} on {info['device']}")

    def predict(self) -> None:
        self._guard(self._predict)

    def _predict(self) -> None:
        session = self._session()
        layer, image = self._image()

        def work(progress):
            return predict_image(session, image, progress=progress)

        self._run("predicting", work, lambda p: self._predicted(layer, image, p))

    def _predicted(self, layer, image, prediction) -> None:
        features = rows_to_features(prediction.rows)
        self._set_layer(
            prediction.labels, {"name": f"{layer.name} nuclei", "features": features}, "labels"
        )
        info = {"file_name": layer.name + ".png", "height": image.shape[0], "width": image.shape[1]}
        box_features = {"id": [r["id"] for r in prediction.rows], "score": list(prediction.scores)}
        data, kwargs, _ = boxes_layer_data(
            prediction.boxes, f"{layer.name} boxes", info, box_features
        )
        self._set_layer(data, kwargs, "shapes")
        self.refresh_layers()
        self.boxes_combo.setCurrentText(f"{layer.name} boxes")
        self.labels_combo.setCurrentText(f"{layer.name} nuclei")
        n = len(prediction.rows)
        if n:
            self.notify("info", f"{n} nuclei in '{layer.name}'")
        else:
            self.notify(
                "warning",
                f"no nucleus detected in '{layer.name}': check that it looks like the training "
                "images (stain, magnification), or train on a few boxes of it",
            )

    def boxes_to_masks(self) -> None:
        self._guard(self._boxes_to_masks)

    def _boxes_to_masks(self) -> None:
        session = self._session()
        layer, image = self._image()
        shapes, boxes = self._boxes(image)
        student = self.student_check.isChecked()

        def work(progress):
            labels = segment_boxes(session, image, boxes, student=student)
            progress(1, 1)
            return labels

        def done(labels):
            name = f"{shapes.name} masks"
            self._set_layer(labels, {"name": name}, "labels")
            self.refresh_layers()
            who = "the student" if student else "SAM as teacher"
            masks = len(np.unique(labels[labels > 0]))
            self.notify("info", f"{len(boxes)} boxes -> {masks} masks ({who})")

        self._run("boxes -> masks", work, done)

    def export(self) -> None:
        self._guard(self._export)

    def _export(self) -> None:
        layer, image = self._image()
        shapes, boxes = self._boxes(image)
        labels = None
        if self.labels_combo.currentText() != NO_LABELS:
            lab = self._layer(self.labels_combo, Labels, "Labels")
            labels = labels_data(lab.data, lab.name, image.shape[:2])
        folder = self.export_edit.text().strip()
        if not folder:
            raise UsageError("no box set folder: give one under Correct and export")
        name = layer.name.replace(" ", "_")
        path = export_box_set(folder, name, image, boxes, labels)
        shapes.metadata[IMAGE_KEY] = {
            "file_name": name + ".png", "height": image.shape[0], "width": image.shape[1]
        }  # fmt: skip
        sets = [s for s in self.sets_edit.text().split(";") if s.strip()]
        if path not in sets:
            self.sets_edit.setText(";".join(sets + [path]))
        self.notify("info", f"{len(boxes)} boxes of '{layer.name}' exported to {path}")

    def train(self) -> None:
        self._guard(self._train)

    def _train(self) -> None:
        sets = [s.strip() for s in self.sets_edit.text().split(";") if s.strip()]
        if not sets:
            raise UsageError("no box set to train on: export an image with its boxes first")
        missing = [s for s in sets if not os.path.isfile(s)]
        if missing:
            raise UsageError(f"box set {missing[0]} does not exist: export into it first")
        config = self.config_edit.text().strip() or DEMO_CONFIG
        output = self.train_output_edit.text().strip() or "output/napari_train"
        steps = self.steps_spin.value()
        opts = []
        if steps:
            opts = ["SOLVER.EPOCHS", "0", "SOLVER.MIN_ITER", "0", "SOLVER.MAX_ITER", str(steps)]
            opts += ["SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", str(max(1, steps // 6))]
            opts += ["SOLVER.CHECKPOINT_PERIOD", str(steps)]
        try:
            layer = self._layer(self.image_combo, Image, "image")
        except UsageError:
            layer = None

        def work(progress):
            weights = train_on_box_sets(
                sets, output, config, opts, on_step=progress, should_stop=self._stop.is_set
            )
            return load_session(os.path.join(output, "config.yaml"), weights)

        def done(session):
            self._loaded(session)
            self.weights_edit.setText(session.weights)
            self.config_edit.setText(session.config_file)
            if layer is not None and layer.name in self.viewer.layers:
                self.image_combo.setCurrentText(layer.name)
                self.predict()

        self._run("training", work, done)
