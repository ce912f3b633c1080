/** Binary units, as memory is sold: 1536 -> "1.5 KiB". */
export function formatBytes(n: number | null | undefined): string {
  if (n === null || n === undefined) {
    return '?';
  }
  let value = n;
  for (const unit of ['B', 'KiB', 'MiB', 'GiB']) {
    if (Math.abs(value) < 1024) {
      return unit === 'B' ? `${value} B` : `${value.toFixed(1)} ${unit}`;
    }
    value /= 1024;
  }
  return `${value.toFixed(1)} TiB`;
}

/** "4m 05s" until a time in seconds since the epoch. */
export function formatCountdown(epochSeconds: number): string {
  const left = Math.max(0, Math.round(epochSeconds - Date.now() / 1000));
  const minutes = Math.floor(left / 60);
  const seconds = left % 60;
  return minutes
    ? `${minutes}m ${String(seconds).padStart(2, '0')}s`
    : `${seconds}s`;
}

export function formatTime(epochSeconds: number): string {
  return new Date(epochSeconds * 1000).toLocaleTimeString();
}

/** A notebook's file name from the path a kernel reports (JPY_SESSION_NAME). */
export function baseName(path: string): string {
  const parts = path.split(/[\\/]/);
  return parts[parts.length - 1] || path;
}
