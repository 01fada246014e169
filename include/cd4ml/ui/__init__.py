"""What people read: the Models view, /cd4ml/metrics and notification messages."""
