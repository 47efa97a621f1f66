"""Which cases to label next: ranking unlabelled cases (``rank``) and the ``medtl suggest`` work (``suggest``).

Layer: above ``evaluate`` (it scores with the trained model and its saved calibrator), below ``report``.
"""
