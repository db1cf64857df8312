//! Pure decisions and reconcile tests of the node controller.
