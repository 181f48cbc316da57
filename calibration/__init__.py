"""INT8 calibration: calibration sets from real slices, QDQ quantisation, accuracy reports (installed as sdk.calibration)."""
