//! Harness for the end-to-end tests: start the real binaries, wait for them, clean up.
