//! The worker: intake consumer and GPU-scoped consumers.
