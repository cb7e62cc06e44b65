"""Load tests that replay traffic shapes (steady, ramp, peak hour) against ditserve over HTTP."""
