-- Lmod modulefile for noyau, installed from the release tarball:
--
--   mkdir -p /opt/noyau/0.1.0
--   tar -xzf noyau-0.1.0-x86_64-linux.tar.gz -C /opt/noyau/0.1.0 --strip-components=1
--   cp noyau.lua $MODULEPATH_SITE/noyau/0.1.0.lua
--
-- The version comes from this file's name (noyau/VERSION.lua), so one copy
-- per version serves them all; change `root` if the site installs elsewhere.
local root = "/opt/noyau"
local version = myModuleVersion()
local prefix = pathJoin(root, version)

whatis("Name: noyau")
whatis("Version: " .. version)
whatis("Description: Jupyter notebooks on HPC clusters: kernels, cells and whole notebooks in batch jobs")
help([[
noyau runs Jupyter kernels, single cells and whole notebooks in batch jobs.
  noyau install --name noyau-python3 --inner python3 --backend slurm --user
  noyau run analysis.ipynb --backend slurm
See README.md in ]] .. prefix .. [[.
]])

if not isDir(pathJoin(prefix, "bin")) then
    LmodError("noyau " .. version .. " is not installed in " .. prefix)
end
prepend_path("PATH", pathJoin(prefix, "bin"))
