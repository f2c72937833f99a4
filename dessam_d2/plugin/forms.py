"""The dock widget's controls, laid out in sections (Model, Segment, Correct and export, Train,
the progress bar and Cancel): Qt only, no behaviour. ``widget.DessamWidget`` connects them to
napari and the library."""

import os
from typing import Callable

from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..recipes.retrain import DEMO_CONFIG

__all__ = ["DessamForm", "DEMO_WEIGHTS", "NO_LABELS"]

DEMO_WEIGHTS = "output/demo/model_final.pth"
NO_LABELS = "(none)"


def _path_row(edit: QLineEdit, pick: Callable[[], str]) -> QHBoxLayout:
    row = QHBoxLayout()
    row.addWidget(edit)
    button = QPushButton("…")
    button.setFixedWidth(28)
    button.clicked.connect(lambda: (lambda p: p and edit.setText(p))(pick()))
    row.addWidget(button)
    return row


def _button(form: QFormLayout, text: str, action: Callable[[], None]) -> QPushButton:
    button = QPushButton(text)
    button.clicked.connect(action)
    form.addRow(button)
    return button


class DessamForm(QWidget):
    """The controls; a subclass provides the actions their buttons call (``load_model``,
    ``predict``, ``boxes_to_masks``, ``export``, ``train``, ``cancel``)."""

    def __init__(self):
        super().__init__()
        layout = QVBoxLayout(self)
        layout.addWidget(self._model_box())
        layout.addWidget(self._image_box())
        layout.addWidget(self._export_box())
        layout.addWidget(self._train_box())
        self.progress_bar = QProgressBar()
        self.progress_bar.setFormat("%v / %m")
        self.status = QLabel("no model loaded")
        self.status.setWordWrap(True)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        row = QHBoxLayout()
        row.addWidget(self.progress_bar)
        row.addWidget(self.cancel_button)
        layout.addLayout(row)
        layout.addWidget(self.status)
        layout.addStretch()

    def _model_box(self) -> QGroupBox:
        box = QGroupBox("Model")
        form = QFormLayout(box)
        self.config_edit = QLineEdit(DEMO_CONFIG)
        self.weights_edit = QLineEdit(DEMO_WEIGHTS if os.path.isfile(DEMO_WEIGHTS) else "")
        self.weights_edit.setPlaceholderText("none: the config's SAM as teacher")
        form.addRow("config", _path_row(self.config_edit, lambda: self._open_file("*.yaml")))
        form.addRow("weights", _path_row(self.weights_edit, lambda: self._open_file("*.pth")))
        self.load_button = _button(form, "Load model", self.load_model)
        self.model_info = QLabel("")
        self.model_info.setWordWrap(True)
        form.addRow(self.model_info)
        return box

    def _image_box(self) -> QGroupBox:
        box = QGroupBox("Segment")
        form = QFormLayout(box)
        self.image_combo = QComboBox()
        self.boxes_combo = QComboBox()
        form.addRow("image", self.image_combo)
        self.predict_button = _button(form, "Predict nuclei", self.predict)
        form.addRow("boxes", self.boxes_combo)
        self.student_check = QCheckBox("trained student (else SAM as teacher)")
        form.addRow(self.student_check)
        self.masks_button = _button(form, "Boxes → masks", self.boxes_to_masks)
        return box

    def _export_box(self) -> QGroupBox:
        box = QGroupBox("Correct and export")
        form = QFormLayout(box)
        self.labels_combo = QComboBox()
        form.addRow("outlines", self.labels_combo)
        self.export_edit = QLineEdit("output/napari_boxes")
        form.addRow("box set", _path_row(self.export_edit, self._open_folder))
        self.export_button = _button(form, "Export image + boxes", self.export)
        return box

    def _train_box(self) -> QGroupBox:
        box = QGroupBox("Train")
        form = QFormLayout(box)
        self.sets_edit = QLineEdit("")
        self.sets_edit.setPlaceholderText("box sets' annotations.json, separated by ;")
        form.addRow("sets", self.sets_edit)
        self.train_output_edit = QLineEdit("output/napari_train")
        form.addRow("output", _path_row(self.train_output_edit, self._open_folder))
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(0, 100000)
        self.steps_spin.setSpecialValueText("the config's")
        form.addRow("steps", self.steps_spin)
        self.train_button = _button(form, "Train, load and predict again", self.train)
        return box

    def _open_file(self, pattern: str) -> str:
        return QFileDialog.getOpenFileName(self, "Open", "", pattern)[0]

    def _open_folder(self) -> str:
        return QFileDialog.getExistingDirectory(self, "Folder")
