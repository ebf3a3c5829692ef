; Inno Setup script: EpiSeg's Windows installer from the one-folder build.
; NOT built or tested by this project yet (no Windows machine); see packaging/README.md.
;
; 1. build the folder:  pyinstaller --noconfirm packaging\episeg.spec   (-> dist\EpiSeg\)
; 2. compile:           iscc /DAppVersion=0.1.0 packaging\windows\episeg.iss
;                       (-> dist\EpiSeg-0.1.0-windows-setup.exe)
; Installs for the current user (no administrator rights), adds a Start menu
; entry and optionally a desktop icon, and an uninstaller.

#ifndef AppVersion
  #define AppVersion "0.1.0"
#endif
#define Root ".."

[Setup]
AppId={{6C0E5E2A-3B8E-4C43-9E0B-0E7C2D5A9B11}
AppName=EpiSeg
AppVersion={#AppVersion}
AppPublisher=EpiSeg developers
DefaultDirName={localappdata}\Programs\EpiSeg
DefaultGroupName=EpiSeg
PrivilegesRequired=lowest
OutputDir={#Root}\..\dist
OutputBaseFilename=EpiSeg-{#AppVersion}-windows-setup
Compression=lzma2/max
SolidCompression=yes
ArchitecturesAllowed=x64compatible
ArchitecturesInstallIn64BitMode=x64compatible
UninstallDisplayIcon={app}\EpiSeg.exe
WizardStyle=modern

[Files]
Source: "{#Root}\..\dist\EpiSeg\*"; DestDir: "{app}"; Flags: recursesubdirs ignoreversion

[Icons]
Name: "{group}\EpiSeg"; Filename: "{app}\EpiSeg.exe"
Name: "{group}\EpiSeg self-test"; Filename: "{cmd}"; Parameters: "/k ""{app}\episeg-cli.exe"" --selftest"
Name: "{group}\Uninstall EpiSeg"; Filename: "{uninstallexe}"
Name: "{userdesktop}\EpiSeg"; Filename: "{app}\EpiSeg.exe"; Tasks: desktopicon

[Tasks]
Name: "desktopicon"; Description: "Create a desktop icon"; Flags: unchecked

[Run]
Filename: "{app}\EpiSeg.exe"; Description: "Start EpiSeg"; Flags: nowait postinstall skipifsilent
