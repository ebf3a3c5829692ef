#!/bin/sh
# Put EpiSeg in the applications menu (and on the desktop, if there is one) of
# this user. Run it once from the unpacked folder; run it again after moving
# the folder. Nothing outside your home folder is touched.
set -e
HERE="$(cd "$(dirname "$0")" && pwd)"
APPS="${XDG_DATA_HOME:-$HOME/.local/share}/applications"
mkdir -p "$APPS"
sed "s|@APPDIR@|$HERE|g" "$HERE/episeg.desktop" > "$APPS/episeg.desktop.part"
mv "$APPS/episeg.desktop.part" "$APPS/episeg.desktop"
chmod +x "$APPS/episeg.desktop"
DESKTOP="$(xdg-user-dir DESKTOP 2>/dev/null || echo "$HOME/Desktop")"
if [ -d "$DESKTOP" ]; then
    cp "$APPS/episeg.desktop" "$DESKTOP/episeg.desktop"
    chmod +x "$DESKTOP/episeg.desktop"
    # GNOME asks before starting desktop launchers it does not trust yet
    gio set "$DESKTOP/episeg.desktop" metadata::trusted true 2>/dev/null || true
fi
echo "EpiSeg is in your applications menu ($APPS/episeg.desktop)."
