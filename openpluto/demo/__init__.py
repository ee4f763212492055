"""``openpluto demo``: synthetic slides with ground truth (also test data), the demo's steps, its report.

- ``synthetic``: H&E-like slides and labelled tiles with known classes and artifacts.
- ``config``: ``DemoConfig``; ``run``: the steps in order; ``commands``: each step as an ``openpluto``
  command, kept in ``commands.txt``; ``pretraining``/``estimate``: the step-bounded pretraining and its
  time estimate; ``feature_maps``/``feature_step``: maps checked against the ground truth;
  ``evaluation``: kNN and linear probe; ``summary``, ``figures``, ``page``, ``report``: what is shown;
  ``check_report``: renders ``report.html`` in headless Chromium and checks it.

Like ``cli``, this package sits on top of the data flow and may import any stage; no stage imports it.
"""
