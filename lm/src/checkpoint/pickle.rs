//! Restricted pickle interpreter (stub).
