#!/usr/bin/env python
"""The napari plugin's picture for the docs: a real window (run under Xvfb where no display is
attached) with an image, the nuclei the plugin predicted in it, and the widget.

    xvfb-run -a -s "-screen 0 1600x1000x24" python tools/napari_screenshot.py \
        --image datasets/synthetic_cytology/test/images/<name>.png --output docs/napari.png

Uses the demo's model (``make demo`` first) unless --config-file / --weights say otherwise.
"""

import argparse
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--image", required=True)
    p.add_argument("--output", required=True, help="PNG to write")
    p.add_argument("--config-file", default="configs/dessam_demo.yaml")
    p.add_argument("--weights", default="output/demo/model_final.pth")
    return p.parse_args(argv)


def wait(widget, app, timeout: float = 300.0) -> None:
    """Run the Qt loop until the widget's job has finished."""
    start = time.time()
    while widget.worker is not None:
        app.processEvents()
        time.sleep(0.02)
        if time.time() - start > timeout:
            raise TimeoutError(f"{widget.job} took over {timeout:.0f} s")
    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)


def main(args) -> int:
    import napari
    from qtpy.QtWidgets import QApplication

    from dessam_d2.data.image_io import read_image_rgb

    viewer = napari.Viewer(show=True)
    viewer.window.resize(1500, 900)
    name = args.image.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    viewer.add_image(read_image_rgb(args.image), name=name, rgb=True)
    _, widget = viewer.window.add_plugin_dock_widget("dessam-d2", "DES-SAM nuclei")
    app = QApplication.instance()
    widget.config_edit.setText(args.config_file)
    widget.weights_edit.setText(args.weights)
    widget.load_button.click()
    wait(widget, app)
    widget.image_combo.setCurrentText(name)
    widget.predict_button.click()
    wait(widget, app)
    errors = [text for level, text in widget.messages if level == "error"]
    if errors:
        print(f"error: {errors[0]}", file=sys.stderr)
        return 2
    viewer.layers[f"{name} nuclei"].contour = 2  # outlines over the image
    viewer.layers.selection.active = viewer.layers[f"{name} nuclei"]
    viewer.reset_view()
    viewer.screenshot(args.output, canvas_only=False)
    print(f"wrote {args.output}: {widget.status.text()}")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
