// Command vcsim serves VMware's vCenter simulator (govmomi's `simulator` package) for Haven's
// tests of the VMware adapter.
//
// It builds a vCenter model (`simulator.VPX()`: one datacenter DC0, one standalone host, one
// cluster of hosts, a distributed port group DC0_DVPG0, the standard network "VM Network",
// local datastores and a few powered-on VMs), serves its SOAP API over plain HTTP and runs until
// it is killed. Once it listens it prints, on stdout, one line per datastore and then the URL:
//
//	VCSIM_DATASTORE LocalDS_0 /tmp/…/govcsim-DC0-LocalDS_0-123
//	VCSIM_URL=http://USER:PASSWORD@127.0.0.1:PORT/sdk
//
// The URL line comes last: a reader that has seen it has seen every datastore line. A
// datastore's folder is where the simulator keeps the files of `[LocalDS_0] some/path`; with
// `-dir` the folders are created below that folder (the simulator makes them with
// ioutil.TempDir, which honours TMPDIR). Login accepts only the user and password given here.
//
// Built offline from Debian's golang-github-vmware-govmomi-dev (govmomi 0.24.2) by
// `xtask/src/vcsim.rs`.
package main

import (
	"flag"
	"fmt"
	"log"
	"net/url"
	"os"
	"sort"

	"github.com/vmware/govmomi/simulator"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to serve on (port 0: any free port)")
	user := flag.String("username", "user", "the only user Login accepts")
	password := flag.String("password", "pass", "its password")
	dir := flag.String("dir", "", "folder to create the datastores' folders in (default: $TMPDIR)")
	hosts := flag.Int("standalone-host", 1, "standalone hosts per datacenter")
	clusters := flag.Int("cluster", 1, "clusters per datacenter")
	clusterHosts := flag.Int("host", 3, "hosts per cluster")
	datastores := flag.Int("ds", 1, "local datastores (LocalDS_0, …), mounted on every host")
	machines := flag.Int("vm", 2, "VMs per standalone host and per cluster")
	portgroups := flag.Int("pg", 1, "distributed port groups per datacenter")
	autostart := flag.Bool("autostart", true, "power the model's VMs on")
	flag.Parse()

	if *dir != "" {
		if err := os.MkdirAll(*dir, 0o700); err != nil {
			log.Fatalf("vcsim: cannot create %s: %v", *dir, err)
		}
		// The model creates each datastore's folder with ioutil.TempDir("", …).
		if err := os.Setenv("TMPDIR", *dir); err != nil {
			log.Fatalf("vcsim: %v", err)
		}
	}

	model := simulator.VPX()
	model.Host = *hosts
	model.Cluster = *clusters
	model.ClusterHost = *clusterHosts
	model.Datastore = *datastores
	model.Machine = *machines
	model.Portgroup = *portgroups
	model.Autostart = *autostart
	if err := model.Create(); err != nil {
		log.Fatalf("vcsim: cannot create the model: %v", err)
	}
	defer model.Remove()

	model.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(*user, *password)}
	server := model.Service.NewServer()
	defer server.Close()

	var lines []string
	for _, entity := range simulator.Map.All("Datastore") {
		ds := entity.(*simulator.Datastore)
		lines = append(lines, fmt.Sprintf("VCSIM_DATASTORE %s %s", ds.Name, ds.Info.GetDatastoreInfo().Url))
	}
	sort.Strings(lines)
	for _, line := range lines {
		fmt.Println(line)
	}
	fmt.Printf("VCSIM_URL=%s\n", server.URL.String())

	select {}
}
