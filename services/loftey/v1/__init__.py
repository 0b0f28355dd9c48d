"""Generated from proto/loftey/v1 by loftey.protogen; do not edit."""
