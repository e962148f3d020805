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
// With `-inventory FILE` the model is shaped after a JSON description before the URL line is
// printed (see `Inventory`): the datacenter and the first datastore renamed, VM folders (paths
// below the datacenter's VM folder), resource pools (below the first cluster's), distributed
// port groups, and the model's VMs replaced by the VMs described, powered on, each with its
// disks (created in the first datastore) and one network adapter.
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
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net/url"
	"os"
	"sort"
	"strings"

	"github.com/vmware/govmomi"
	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

// Inventory describes the shape `-inventory` gives the model. Empty fields leave the model's.
type Inventory struct {
	Datacenter string   `json:"datacenter"`
	Datastore  string   `json:"datastore"`
	Folders    []string `json:"folders"`
	Pools      []string `json:"pools"`
	Portgroups []string `json:"portgroups"`
	VMs        []VM     `json:"vms"`
}

// VM is one machine of an Inventory.
type VM struct {
	Name      string `json:"name"`
	Disks     int    `json:"disks"`
	DiskMiB   int64  `json:"disk_mib"`
	Network   string `json:"network"`
	CPUs      int32  `json:"cpus"`
	MemoryMiB int64  `json:"memory_mib"`
}

// shape applies inv to the model the server at u serves.
func shape(u *url.URL, inv Inventory) error {
	ctx := context.Background()
	c, err := govmomi.NewClient(ctx, u, true)
	if err != nil {
		return fmt.Errorf("login: %w", err)
	}
	defer c.Logout(ctx)
	finder := find.NewFinder(c.Client, true)
	dc, err := finder.DefaultDatacenter(ctx)
	if err != nil {
		return err
	}
	finder.SetDatacenter(dc)
	if inv.Datacenter != "" {
		task, err := dc.Rename(ctx, inv.Datacenter)
		if err != nil {
			return err
		}
		if err := task.Wait(ctx); err != nil {
			return fmt.Errorf("renaming the datacenter: %w", err)
		}
	}
	folders, err := dc.Folders(ctx)
	if err != nil {
		return err
	}
	for _, path := range inv.Folders {
		parent := folders.VmFolder
		for _, name := range strings.Split(path, "/") {
			children, err := parent.Children(ctx)
			if err != nil {
				return err
			}
			var next *object.Folder
			for _, child := range children {
				if f, ok := child.(*object.Folder); ok {
					if n, err := f.ObjectName(ctx); err == nil && n == name {
						next = f
					}
				}
			}
			if next == nil {
				if next, err = parent.CreateFolder(ctx, name); err != nil {
					return fmt.Errorf("folder %s: %w", path, err)
				}
			}
			parent = next
		}
	}
	clusters, err := finder.ClusterComputeResourceList(ctx, "*")
	if err != nil {
		return err
	}
	rootPool, err := clusters[0].ResourcePool(ctx)
	if err != nil {
		return err
	}
	for _, name := range inv.Pools {
		if _, err := rootPool.Create(ctx, name, types.DefaultResourceConfigSpec()); err != nil {
			return fmt.Errorf("resource pool %s: %w", name, err)
		}
	}
	if len(inv.Portgroups) > 0 {
		net, err := finder.Network(ctx, "DVS0")
		if err != nil {
			return err
		}
		dvs := net.(*object.DistributedVirtualSwitch)
		var specs []types.DVPortgroupConfigSpec
		for _, name := range inv.Portgroups {
			specs = append(specs, types.DVPortgroupConfigSpec{
				Name:     name,
				Type:     string(types.DistributedVirtualPortgroupPortgroupTypeEarlyBinding),
				NumPorts: 8,
			})
		}
		task, err := dvs.AddPortgroup(ctx, specs)
		if err != nil {
			return err
		}
		if err := task.Wait(ctx); err != nil {
			return fmt.Errorf("port groups: %w", err)
		}
	}
	if len(inv.VMs) == 0 {
		return nil
	}
	// The model's VMs make way for the described ones.
	existing, err := finder.VirtualMachineList(ctx, "*")
	if err != nil {
		return err
	}
	for _, vm := range existing {
		if task, err := vm.PowerOff(ctx); err == nil {
			_ = task.Wait(ctx)
		}
		task, err := vm.Destroy(ctx)
		if err != nil {
			return err
		}
		if err := task.Wait(ctx); err != nil {
			return fmt.Errorf("removing the model's VMs: %w", err)
		}
	}
	ds, err := finder.DefaultDatastore(ctx)
	if err != nil {
		return err
	}
	dsName, err := ds.ObjectName(ctx)
	if err != nil {
		return err
	}
	host, err := finder.HostSystem(ctx, "DC0_H0")
	if err != nil {
		// Found by its name before the datacenter was renamed; any standalone host does.
		hosts, err := finder.HostSystemList(ctx, "*")
		if err != nil {
			return err
		}
		host = hosts[0]
	}
	hostPool, err := host.ResourcePool(ctx)
	if err != nil {
		return err
	}
	for _, m := range inv.VMs {
		network, err := finder.Network(ctx, m.Network)
		if err != nil {
			return fmt.Errorf("vm %s: %w", m.Name, err)
		}
		backing, err := network.EthernetCardBackingInfo(ctx)
		if err != nil {
			return err
		}
		var devices object.VirtualDeviceList
		scsi, err := devices.CreateSCSIController("lsilogic")
		if err != nil {
			return err
		}
		devices = append(devices, scsi)
		controller, err := devices.FindDiskController("scsi")
		if err != nil {
			return err
		}
		for i := 0; i < m.Disks; i++ {
			disk := devices.CreateDisk(controller, ds.Reference(),
				fmt.Sprintf("[%s] %s/%s_%d.vmdk", dsName, m.Name, m.Name, i))
			disk.CapacityInKB = m.DiskMiB * 1024
			devices = append(devices, disk)
		}
		nic, err := devices.CreateEthernetCard("e1000", backing)
		if err != nil {
			return err
		}
		devices = append(devices, nic)
		changes, err := devices.ConfigSpec(types.VirtualDeviceConfigSpecOperationAdd)
		if err != nil {
			return err
		}
		spec := types.VirtualMachineConfigSpec{
			Name:         m.Name,
			GuestId:      "otherLinux64Guest",
			NumCPUs:      m.CPUs,
			MemoryMB:     m.MemoryMiB,
			Files:        &types.VirtualMachineFileInfo{VmPathName: fmt.Sprintf("[%s]", dsName)},
			DeviceChange: changes,
		}
		task, err := folders.VmFolder.CreateVM(ctx, spec, hostPool, host)
		if err != nil {
			return err
		}
		info, err := task.WaitForResult(ctx, nil)
		if err != nil {
			return fmt.Errorf("vm %s: %w", m.Name, err)
		}
		vm := object.NewVirtualMachine(c.Client, info.Result.(types.ManagedObjectReference))
		task, err = vm.PowerOn(ctx)
		if err != nil {
			return err
		}
		if err := task.Wait(ctx); err != nil {
			return fmt.Errorf("powering vm %s on: %w", m.Name, err)
		}
	}
	return nil
}

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
	inventory := flag.String("inventory", "", "a JSON file that shapes the model (see Inventory)")
	flag.Parse()

	var inv Inventory
	if *inventory != "" {
		text, err := os.ReadFile(*inventory)
		if err != nil {
			log.Fatalf("vcsim: %v", err)
		}
		if err := json.Unmarshal(text, &inv); err != nil {
			log.Fatalf("vcsim: %s: %v", *inventory, err)
		}
	}

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
	// The datastore's name, in place (the simulator has no RenameDatastore); before anything
	// refers to it by name.
	if inv.Datastore != "" {
		for _, entity := range simulator.Map.All("Datastore") {
			ds := entity.(*simulator.Datastore)
			if ds.Name == "LocalDS_0" {
				ds.Name = inv.Datastore
				ds.Summary.Name = inv.Datastore
			}
		}
	}

	model.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(*user, *password)}
	server := model.Service.NewServer()
	defer server.Close()
	if *inventory != "" {
		if err := shape(server.URL, inv); err != nil {
			log.Fatalf("vcsim: shaping the model after %s: %v", *inventory, err)
		}
	}

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
